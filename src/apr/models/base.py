"""What an architecture family declares, once: names, parameters, tensor table, stage graph, forward, and
the runtime maps. Everything that knows about architectures reads these records (STYLE §4b).

- `Variant`: one member of a family as the files name it (GGUF `general.architecture`, HF `architectures`),
  with its RoPE pairing in GGUF (llama.cpp's NORM or NEOX rope type); a variant that shares its names with
  another (Mixtral's GGUF says "llama") `claims` the files that are its own.
- `TensorRole`: a canonical tensor (GGUF spelling, `{i}` for the layer) with its HF spelling(s) (`{e}` for
  the expert: one file tensor per expert, stacked on a new first axis), expected shape and presence rule.
  `Ignorable`: a tensor a checkpoint may carry that the math does not use, with why.
- `StageNode`: a stage with the stages it is computed from, the tensor roles it consumes and its dims;
  growth analysis, manifest dims, stage order and "first divergence" derive from the graph.
- `Family`: the above plus `forward` and the transformers / llama.cpp capture maps.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import numpy.typing as npt

from apr.engine.weights import Weights
from apr.formats.base import ConfigSource
from apr.models.config import ModelConfig
from apr.models.params import Param
from apr.stages import Stage, Tap

PREV_OUTPUT: Final = "layer_input"  # post_ffn_residual of the layer before (or the embedding)
REQUIRED: Final = "required"  # in every layer (or once, for a global role)
OPTIONAL: Final = "optional"  # in every layer or in none (a config flag may follow from which)
ROPE_NORM: Final = "norm"  # llama.cpp LLAMA_ROPE_TYPE_NORM: adjacent pairs, Q/K rows permuted per head
ROPE_NEOX: Final = "neox"  # LLAMA_ROPE_TYPE_NEOX: half-split pairs, rows in HF order
APR_ROPE_TYPE: Final = {ROPE_NORM: 0, ROPE_NEOX: 2}  # the .apr `rope_type` values


@dataclass(frozen=True, slots=True)
class Variant:
    name: str  # apr's architecture name (GGUF spelling when it has one): "llama", "mistral", "gemma2"
    gguf: tuple[str, ...]  # general.architecture values
    hf: tuple[str, ...]  # HF `architectures` class names
    rope: str = ROPE_NORM  # how its GGUF stores Q/K rows (llama.cpp's rope type for the arch)
    hf_model_type: str = ""  # config.json `model_type` when it is not `name` (Gemma 3 text: gemma3_text)
    apr_hf_names: bool = False  # aprender's GGUF import stores its tensors under HF names (qwen2_map_name)
    # names shared with another family's variant: this one takes only the sources `claims` is true for,
    # and is tried before the variants without a claim (models/registry.py)
    claims: Callable[[ConfigSource], bool] | None = None


@dataclass(frozen=True, slots=True)
class TensorRole:
    """A canonical tensor. A fused one (Phi-3's qkv) is a row range of a stored tensor: `rows` gives
    [r0, r1) of the tensor named `gguf` (in GGUF) / `hf` (in HF) that holds it."""

    name: str  # canonical template: "blk.{i}.attn_q.weight", "token_embd.weight"
    hf: str  # HF template: "model.layers.{i}.self_attn.q_proj.weight" ("" if HF files lack it)
    shape: Callable[[ModelConfig], tuple[int, ...]]
    presence: str = REQUIRED
    gguf: str = ""  # the GGUF template when the GGUF stores it fused under another name
    rows: Callable[[ModelConfig], tuple[int, int]] | None = None  # its rows in the fused tensor
    hf_alt: str = ""  # a second HF spelling, tried after `hf` (transformers 5's fused expert parameters)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


@dataclass(frozen=True, slots=True)
class Ignorable:
    pattern: str  # regex over the file's tensor name
    reason: str

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


@dataclass(frozen=True, slots=True)
class StageNode:
    stage: Stage
    inputs: tuple[Stage | str, ...]  # stages of the same layer, or PREV_OUTPUT
    weights: tuple[str, ...] = ()  # canonical role templates it consumes
    dims: tuple[str, ...] = ("seq", "hidden")
    norm: bool = False  # an RMSNorm output: its weights re-weight channels (growth class)
    matmul: bool = False  # a quantized matmul quantizes its activations in llama.cpp


class ForwardFn(Protocol):
    def __call__(
        self,
        w: Weights,
        cfg: ModelConfig,
        token_ids: npt.ArrayLike,
        tap: Tap,
        *,
        lm_head_all: bool = False,
        on_layer: Callable[[int], None] | None = None,
    ) -> npt.NDArray[Any]: ...


@dataclass(frozen=True, slots=True)
class HookMap:
    """Where transformers exposes each stage: (submodule of a decoder layer, "in"|"out", stage) and
    (submodule of the model, side, stage); "" is the decoder layer itself."""

    layer: tuple[tuple[str, str, Stage], ...]
    model: tuple[tuple[str, str, Stage], ...]
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # or fused
    rms_norm_offset: float = 0.0  # what the family's RMSNorm adds to its weight (float64 lift)
    # (submodule, gate submodule, stage): stage = sigmoid(gate's output) · submodule's output, a product no
    # module returns (Qwen2-MoE's shared expert); both outputs are hooked and multiplied by torch as the
    # model does
    gated: tuple[tuple[str, str, Stage], ...] = ()


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # the module: apr.models.<name>
    variants: tuple[Variant, ...]
    params: tuple[Param, ...]
    finish: Callable[[Variant, ConfigSource, Mapping[str, Any], frozenset[str], str], ModelConfig]
    roles: Callable[[ModelConfig], tuple[TensorRole, ...]]
    graph: Callable[[ModelConfig], tuple[StageNode, ...]]
    forward: ForwardFn
    layer: Callable[[Weights, ModelConfig, int, npt.NDArray[Any], Tap], npt.NDArray[Any]]  # one layer, alone
    hooks: HookMap
    ggml_nodes: Mapping[str, Stage]  # llama.cpp cb_eval names (without "-{layer}") → per-layer stage
    ignorable: tuple[Ignorable, ...] = ()
    gguf_keys: tuple[str, ...] = ()  # {arch}.* keys the family reads or knows to be harmless
    hf_refuse: Mapping[str, Callable[[Any], str | None]] = field(default_factory=dict)  # key → why not
    hf_extra: Callable[[ModelConfig], dict[str, Any]] = lambda cfg: {}  # config.json keys no Param writes

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)
