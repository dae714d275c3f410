"""Decoder layers of a transformers model run on given inputs (`apr bisect --isolate`, B in transformers).

    with transformers_layers(Path("model-hf"), token_ids, hooks=family.hooks) as run:
        run.layer(3, hidden, tap)  # hidden: (S, D), the input of layer 3; tap gets layer 3's stages
        run.layers({0: x0, 1: x1, 2: x2}, tap)  # each layer on its own input, in one forward pass

The layers are the model's own decoder-layer modules, called by the model's own forward: `model(input_ids)`
runs with a forward pre-hook on each `model.model.layers[i]` given an input that replaces its hidden-state
argument by that input, and a forward hook that stops the pass once the last of them has returned. So the
position ids, the rotary embeddings (local and global), the causal / sliding-window mask and any per-layer-
type choice are built exactly as the model builds them for a normal pass (nothing re-derived here), and the
stages are tapped by the transformers runtime's own hooks (runtimes/transformers_capture.py `tapped`).
Layers without a given input run as usual and their stages are dropped. Since every given layer's input is
replaced, one pass isolates all of them: what layer i hands on is overwritten before layer i + 1 sees it.

The input ids only fix the sequence length here (a replaced layer never sees their embedding).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from apr.errors import InferenceError, ValidationError
from apr.models.base import HookMap
from apr.models.common import LLAMA_LAYER_HOOKS
from apr.runtimes.base import Array, check_token_ids
from apr.runtimes.transformers import open_transformers
from apr.runtimes.transformers_capture import tapped
from apr.stages import StageId, Tap


class LayerRunner(Protocol):
    def layer(self, layer: int, hidden: Array, tap: Tap, /) -> None: ...

    def layers(self, inputs: Mapping[int, Array], tap: Tap, /) -> None: ...


class _Stop(Exception):
    """Raised by the hook after the last given layer: the rest of the pass is not needed."""


@dataclass(frozen=True, slots=True)
class _Runner:
    torch: Any
    model: Any
    ids: Any  # (1, S) input ids
    hooks: HookMap

    def layer(self, layer: int, hidden: Array, tap: Tap, /) -> None:
        self.layers({layer: hidden}, tap)

    def layers(self, inputs: Mapping[int, Array], tap: Tap, /) -> None:
        modules, torch = self.model.model.layers, self.torch
        bad = [i for i in inputs if not 0 <= i < len(modules)]
        if bad:
            raise ValidationError(f"layer {bad[0]} is outside the model's {len(modules)} layers")
        if not inputs:
            return
        dtype = next(self.model.parameters()).dtype
        given = {
            i: torch.from_numpy(np.array(x, dtype=np.float32)).to(dtype).reshape(1, self.ids.shape[1], -1)
            for i, x in inputs.items()
        }

        def only(sid: StageId, value: Array) -> None:
            if sid.layer in given and sid.stage.per_layer:
                tap(sid, value)

        def stop(_m: Any, _args: tuple[Any, ...], _out: Any) -> None:
            raise _Stop

        stopped = False
        with tapped(self.model, torch, only, self.hooks):
            handles = [  # the swaps before, the stop after the runtime's own hooks on the layer
                modules[i].register_forward_pre_hook(_swap(x), with_kwargs=True, prepend=True)
                for i, x in given.items()
            ]
            handles.append(modules[max(given)].register_forward_hook(stop))
            try:
                self.model(input_ids=self.ids, use_cache=False)
            except _Stop:
                stopped = True
            finally:
                for h in handles:
                    h.remove()
        if not stopped:
            raise InferenceError(f"transformers never ran decoder layer {max(given)}")


def _swap(x: Any) -> Callable[..., tuple[Any, Any]]:
    """A pre-hook handing the layer `x` as its hidden states (positional or keyword)."""

    def swap(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        if args:
            return (x, *args[1:]), kwargs
        return args, kwargs | {"hidden_states": x}

    return swap


@contextlib.contextmanager
def transformers_layers(
    model_path: Path, token_ids: Sequence[int], *, hooks: HookMap | None = None, dtype: str = "float32"
) -> Iterator[LayerRunner]:
    """Load the model once; yield a runner of its layers on given inputs (see the module docstring)."""
    hooks = hooks or HookMap(LLAMA_LAYER_HOOKS, ())
    torch, _, model = open_transformers(Path(model_path), dtype, hooks)
    ids = torch.tensor([check_token_ids(token_ids, int(model.config.vocab_size))])
    yield _Runner(torch, model, ids, hooks)
