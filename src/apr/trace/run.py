"""Run a forward pass on a model and capture it: tokenizer, engine choice, plan check, writer, manifest.

`prepare_trace` opens the model and tokenizes the prompt (cheap); `PreparedTrace.run` runs the chosen engine
with a tap. Engines are a table: the reference numpy engine (default), transformers and llama.cpp (optional
extras, imported only when chosen); a runtime is refused, before any work, a model format it cannot load
(apr.runtimes.base `check_loadable`). Every engine reports how it ran (`EngineRun`); the writer records it.

The model's bytes are fingerprinted beside the forward pass (apr.trace.fingerprint `intact`: sha256, and an
.apr file's footer CRC32 on the same read). A model whose checksum fails raises FormatError before the
trace directory is swapped in: a corrupt file leaves no trace behind. `engine_fn`'s engines (a payload
report) run beside the same check of an .apr file (and hash nothing else).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from apr.atomicfile import held_result, held_signals
from apr.engine.weights import Weights
from apr.errors import AprError, ValidationError
from apr.formats.config import QKLayout
from apr.models import Model, open_model
from apr.models.generic import NAME as GENERIC
from apr.runtimes import ENGINE_LLAMACPP, ENGINE_TRANSFORMERS, RuntimeRun
from apr.runtimes.base import check_loadable
from apr.stages import Tap
from apr.trace.estimate import DiskEstimate, estimate_disk
from apr.trace.fingerprint import check_intact, intact
from apr.trace.manifest import RunInfo
from apr.trace.plan import TracePlan
from apr.trace.prompt import Prompt, encode_prompt
from apr.trace.writer import TraceResult, TraceWriter
from apr.version import __version__

if TYPE_CHECKING:  # built only for a text prompt (apr.trace.prompt)
    from apr.formats.tokenizer import Tokenizer

# ggml: f32, with every matmul done as ggml-cpu does it (apr.quant.vecdot; reference engine only)
PRECISION_GGML: Final = "ggml"
PRECISIONS: Final[dict[str, type[np.floating[Any]]]] = {
    "f32": np.float32,
    "f64": np.float64,
    PRECISION_GGML: np.float32,
}
# the KV cache's element type: f32, or f16 as llama.cpp stores it by default (reference and llama.cpp engines)
KV_TYPES: Final = ("f32", "f16")
KV_F16: Final = "f16"


@dataclass(frozen=True, slots=True)
class TraceOptions:
    engine: str = "reference"
    precision: str = "f32"
    lm_head_all: bool = False
    n_threads: int = 2
    on_layer: Callable[[int], None] | None = None  # progress callback (reference engine)
    max_disk: int | None = None  # refuse a trace estimated to write more (the free space always applies)
    kv_type: str = "f32"  # KV_TYPES: f16 rounds K and V after RoPE as llama.cpp's cache stores them


@dataclass(frozen=True, slots=True)
class EngineRun:
    engine: str
    version: str
    qk_layout: QKLayout
    settings: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    logits: npt.NDArray[Any] | None = None


EngineFn = Callable[[Path, Model, tuple[int, ...], Tap, TraceOptions], EngineRun]


def _reference(path: Path, model: Model, ids: tuple[int, ...], tap: Tap, opt: TraceOptions) -> EngineRun:
    ggml = opt.precision == PRECISION_GGML
    w = Weights(model, PRECISIONS[opt.precision], ggml=ggml, kv_f16=opt.kv_type == KV_F16)
    cfg = model.config
    logits = model.family.forward(w, cfg, ids, tap, lm_head_all=opt.lm_head_all, on_layer=opt.on_layer)
    settings = {"family": model.family.name, "rope_pairing": cfg.qk_layout.rope_pairing}
    settings["kv_cache"] = opt.kv_type
    if ggml:
        settings.update(ggml_settings(model, opt.kv_type))
    return EngineRun(
        "reference", f"apr {__version__} / numpy {np.__version__}", cfg.qk_layout, settings, logits=logits
    )


def ggml_settings(model: Model, kv_type: str = "f32") -> dict[str, str]:
    """How `--precision ggml` ran, for the manifest: each matrix weight type → its activation type."""
    from apr.quant.vecdot import VEC_DOT_TYPE  # loaded only for --precision ggml
    from apr.quant.vecdot_lanes import LANE_TYPES

    types = sorted({t.qtype for t in model.tensors() if len(t.shape) >= 2 and t.qtype in VEC_DOT_TYPE})
    return {
        "matmul": "ggml-cpu emulation (apr.quant.vecdot): activations converted to the vec_dot type",
        "vec_dot_types": ", ".join(f"{t.name}→{VEC_DOT_TYPE[t].name}" for t in types),
        "kernel_order": f"{', '.join(sorted(t.name for t in LANE_TYPES))}: ggml-cpu x86 AVX2's own "
        "(Q4_K / IQ4_NL as repacked 8x8, K / IQ4_XS vec_dot below 8 tokens, tiled from 8); others: BLAS",
        "activation_quantizers": "x86 AVX2 q8_0/q8_1 (id = 127/amax, round half to even), q8_K reference",
        "ops": "RMSNorm and SiLU in ggml's f32 arithmetic (every f32 run); RoPE tables and rotation, "
        "Q·Kᵀ, softmax and ·V in ggml-cpu's f32 order (non-flash attention)",
        "kv_cache": kv_type,
        **(
            {"attention": "Q and softmax(Q·Kᵀ) rounded to f16 (the f16 cache's vec_dot type)"}
            if kv_type == KV_F16
            else {}
        ),
    }


TORCH_DTYPES: Final = {"f32": "float32", "f64": "float64"}


def _engine_run(r: RuntimeRun) -> EngineRun:
    why = {
        s.value: next((n for n in r.notes if s.value in n), f"{r.engine} does not expose it")
        for s in r.unavailable
    }
    return EngineRun(r.engine, r.engine_version, r.qk_layout, dict(r.settings), why, tuple(r.notes))


def _transformers(path: Path, model: Model, ids: tuple[int, ...], tap: Tap, opt: TraceOptions) -> EngineRun:
    if opt.precision not in TORCH_DTYPES:
        raise ValidationError(f"--engine transformers computes in {' or '.join(TORCH_DTYPES)} only")
    if opt.kv_type != "f32":
        raise ValidationError(
            f"--engine transformers keeps its KV cache in f32; drop --kv-type {opt.kv_type}"
        )
    check_loadable(ENGINE_TRANSFORMERS, path, model.format_name)
    from apr.runtimes.transformers import run_transformers  # a reference trace does not load it

    stages = [n.stage for n in model.graph()]
    return _engine_run(
        run_transformers(
            path,
            ids,
            tap,
            dtype=TORCH_DTYPES[opt.precision],
            hooks=model.family.hooks,
            expected=stages,
            partial_ok=model.family.name == GENERIC,
        )
    )


def _llamacpp(path: Path, model: Model, ids: tuple[int, ...], tap: Tap, opt: TraceOptions) -> EngineRun:
    if opt.precision != "f32":
        raise ValidationError(f"--engine llama.cpp computes in f32 only; drop --precision {opt.precision}")
    check_loadable(ENGINE_LLAMACPP, path, model.format_name)
    from apr.runtimes.llamacpp import run_llamacpp  # a reference trace does not load it

    stages = [n.stage for n in model.graph()]
    return _engine_run(
        run_llamacpp(
            path,
            ids,
            tap,
            n_threads=opt.n_threads,
            nodes=model.family.ggml_nodes,
            expected=stages,
            partial_ok=model.family.name == GENERIC,
            kv_type=opt.kv_type,
        )
    )


ENGINES: Final[dict[str, EngineFn]] = {
    "reference": _reference,
    ENGINE_TRANSFORMERS: _transformers,  # optional extras: torch / llama_cpp are imported when a run starts
    ENGINE_LLAMACPP: _llamacpp,
}


def engine_fn(opt: TraceOptions) -> EngineFn:
    """The engine `opt` names, run beside the model's integrity check (`check_intact`: an .apr file's footer
    CRC, from the fingerprint cache or one read that fills it; other formats read nothing): a model whose
    checksum fails raises FormatError once the pass is done, before its result reaches the caller."""
    run_engine = _engine(opt)

    def checked(path: Path, model: Model, ids: tuple[int, ...], tap: Tap, o: TraceOptions) -> EngineRun:
        with ThreadPoolExecutor(1, thread_name_prefix="apr-crc32") as pool:
            with held_signals():
                check = pool.submit(check_intact, path)
            eng = run_engine(path, model, ids, tap, o)
            held_result(check)
        return eng

    return checked


def _engine(opt: TraceOptions) -> EngineFn:
    if opt.engine not in ENGINES:
        raise ValidationError(f"unknown engine {opt.engine!r} (choose from {', '.join(ENGINES)})")
    if opt.precision not in PRECISIONS:
        raise ValidationError(f"unknown precision {opt.precision!r} (choose from {', '.join(PRECISIONS)})")
    if opt.kv_type not in KV_TYPES:
        raise ValidationError(f"unknown KV cache type {opt.kv_type!r} (choose from {', '.join(KV_TYPES)})")
    return ENGINES[opt.engine]


@dataclass
class PreparedTrace:
    path: Path
    model: Model
    tokenizer: Tokenizer | None  # None when the prompt was token ids (no tokenizer built)
    request: Prompt
    token_ids: tuple[int, ...]
    chat_text: str | None = None  # the rendered chat template the ids come from (a chat prompt)
    _model_tok: Tokenizer | None = field(default=None, init=False, repr=False)
    _model_tok_built: bool = field(default=False, init=False, repr=False)

    def decoder(self) -> Tokenizer | None:
        """What shows token ids as text: the prompt's tokenizer, or for a prompt of token ids the model's
        own, built on first use. None when the model has none or apr refuses it (ids are shown bare)."""
        if self.tokenizer is not None:
            return self.tokenizer
        if not self._model_tok_built:
            self._model_tok, self._model_tok_built = _model_tokenizer(self.model), True
        return self._model_tok

    @property
    def prompt(self) -> str:
        """The prompt's text (the user message of a chat prompt; "" for token ids)."""
        return self.request.text or ""

    @property
    def shown_prompt(self) -> str | None:
        """What the model reads, as text: the rendered chat, the prompt, or None for token ids."""
        return self.chat_text if self.chat_text is not None else self.request.text

    def run_info(self, eng: EngineRun, opt: TraceOptions, sha: str = "", size: int = 0) -> RunInfo:
        req = self.request
        return RunInfo(
            model_path=str(self.path),
            model_format=self.model.format_name,
            model_sha256=sha,
            model_bytes=size,
            config=self.model.config,
            prompt=self.prompt,
            token_ids=self.token_ids,
            prompt_source=req.source,
            prompt_file=None if req.file is None else str(req.file),
            system_prompt=req.system,
            chat_text=self.chat_text,
            engine=eng.engine,
            engine_version=eng.version,
            precision=opt.precision,
            kv_type=opt.kv_type,
            settings=eng.settings,
            qk_layout=eng.qk_layout,
            lm_head_positions="all" if opt.lm_head_all else "last",
            notes=eng.notes,
            unavailable=eng.unavailable,
            tensor_types={t.name: t.qtype.name for t in self.model.tensors()},
        )

    def estimate_disk(self, plan: TracePlan, out_dir: Path, opt: TraceOptions) -> DiskEstimate:
        """What the trace will write to `out_dir`, against its free space and `opt.max_disk`."""
        cfg = self.model.config
        plan = plan.for_model(cfg.n_layers, self.model.stages())
        n = len(self.token_ids)
        stages = self.model.stages()
        return estimate_disk(plan, cfg, stages, n, out_dir, lm_head_all=opt.lm_head_all, limit=opt.max_disk)

    def run(self, plan: TracePlan, out_dir: Path, opt: TraceOptions) -> TraceOutcome:
        """Run the engine once, writing the plan's stages to `out_dir` (atomically, with a manifest)."""
        cfg = self.model.config
        plan = plan.for_model(cfg.n_layers, self.model.stages())
        self.estimate_disk(plan, out_dir, opt).check()  # ValidationError: over the free space / max_disk
        run_engine = _engine(opt)
        check_loadable(opt.engine, self.path, self.model.format_name)  # before the writer and the hash
        base = EngineRun(opt.engine, "", cfg.qk_layout)
        writer = TraceWriter(out_dir, plan, self.run_info(base, opt))
        # hashing the model (seconds for a 7B file) overlaps the forward pass: hashlib releases the GIL
        with writer, ThreadPoolExecutor(1, thread_name_prefix="apr-sha256") as pool:
            with held_signals():  # not inside the executor's locks: its shutdown would wait on them
                digest = pool.submit(intact, self.path)
            eng = run_engine(self.path, self.model, self.token_ids, writer, opt)
            # raises (a corrupt .apr: FormatError) inside the writer's block, so nothing is committed
            model_bytes = held_result(digest)
            # the manifest records how the engine actually ran, and which model bytes it ran on
            writer.run = self.run_info(eng, opt, model_bytes.sha256, model_bytes.bytes)
        return TraceOutcome(writer.result, writer.run, eng)


@dataclass(frozen=True, slots=True)
class TraceOutcome:
    result: TraceResult
    run: RunInfo
    engine: EngineRun


def _model_tokenizer(model: Model) -> Tokenizer | None:
    try:
        spec = model.tokenizer_spec()
        if spec is None:
            return None
        from apr.formats.tokenizer import build_tokenizer

        return build_tokenizer(spec)
    except AprError:  # a tokenizer apr does not support: only the display of ids goes without it
        return None


def prepare_trace(path: Path, prompt: Prompt | str, engine: str = "reference") -> PreparedTrace:
    """Open the model lazily and turn the prompt into its token ids (apr.trace.prompt): text through the
    model's own tokenizer, a chat prompt through its chat template, token ids checked against its vocab.

    >>> prepare_trace(Path("smollm2.gguf"), Prompt("Hi", chat=True)).token_ids[-9:]  # doctest: +SKIP
    (4093, 198, 26843, 2, 198, 1, 520, 9531, 198)
    """
    request = Prompt(prompt) if isinstance(prompt, str) else prompt
    model = open_model(path, runtime_only=engine != "reference")  # a runtime runs what no family declares
    try:
        check_loadable(engine, path, model.format_name)
    except BaseException:
        model.close()
        raise
    enc = encode_prompt(request, model)
    return PreparedTrace(path, model, enc.tokenizer, request, enc.token_ids, enc.chat_text)
