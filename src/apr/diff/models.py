"""`apr diff MODEL_A MODEL_B`: what differs between two checkpoints before any forward pass.

Four comparisons, as values (report/model_diff.py renders them):

- config: every ModelConfig field (RoPE scaling field by field), each difference marked as changing the
  math or only how the file stores the same math (Q/K row order, Gemma's stored 1 + w, Llama 3's scaling
  as a `rope_freqs` tensor);
- tokenizer: vocabulary size, the special ids and flags, the first differing token and merge, and how
  both tokenizers encode a fixed set of probe texts (diff/tokenizer_probe.py);
- tensors under canonical names: missing in B, extra in B, a different shape, a different type;
- tensor data: every tensor both store alike, read in full (diff/tensor_data.py; `data=False` skips it).

The verdict is one of VERDICTS: "differ", "same" only when everything was compared, "unverified" when
nothing compared differs but something could not be compared (data of different types, a tokenizer that
cannot be built): never "same" on a part that was not looked at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

import numpy as np

from apr.diff.tensor_data import DataCheck, compare_data, paired_names, skip_data, tied_lm_head
from apr.errors import AprError
from apr.formats import detect_format
from apr.formats.base import TokenizerSpec
from apr.formats.names import OUTPUT
from apr.formats.tokenizer_probe import ProbeCheck, probe_tokenizers
from apr.formats.tokenizer_special import CONTROL, Attr, token_attrs
from apr.models import Model
from apr.models.config import ModelConfig, RopeScaling
from apr.models.exchange_gguf import ROPE_FREQS, ROPE_FREQS_RTOL, rope_freqs

# fields whose difference is how a format stores the same math, not a different model
STORAGE_FIELDS: Final = {
    "qk_layout": "Q/K row order of the file (the forward pairs RoPE to match)",
    "norm_offset": "norm weights stored as w or 1 + w",
    "rope_scaling.freq_factors": "Llama 3 scaling stored as a rope_freqs tensor",
}
# fields stated two ways for the same math, and the value the forward pass uses: a difference is storage
# only when these agree (a Gemma GGUF leaves the score scale at 0, its HF export states query_pre_attn_scalar)
EFFECTIVE: Final[dict[str, tuple[Callable[[ModelConfig], Any], str]]] = {
    "attn_scale": (
        lambda c: c.attn_scale or c.head_dim**-0.5,
        "the same score scale: 1/sqrt(head_dim), stated on one side, left at 0 (meaning it) on the other",
    ),
}
HF_TOKENIZER: Final = "tokenizer.json"  # TokenizerSpec.model of an HF folder's tokenizer
TOKENIZER_FIELDS: Final = ("bos_id", "eos_id", "add_bos", "add_eos", "add_space_prefix")
VERDICTS: Final = ("differ", "same", "unverified")
STORAGE_KINDS: Final = ("type", "tied", "stored")  # tensor differences that do not change the math
# the attribute bits that still count beside CONTROL (`_acted_on`)
KEPT_WITH_CONTROL: Final = int(Attr.LSTRIP | Attr.RSTRIP | Attr.UNKNOWN)
ProgressFactory = Callable[[str, int], Callable[[int], None]]  # (label, total) → on_item(i)


@dataclass(frozen=True, slots=True)
class FieldDiff:
    name: str  # ModelConfig field, "rope_scaling.factor" for a RopeScaling one
    a: Any
    b: Any
    storage: str = ""  # why this is only a storage difference ("" when the math differs)


@dataclass(frozen=True, slots=True)
class TokenizerDiff:
    a_size: int | None  # None: that side has no tokenizer
    b_size: int | None
    fields: list[FieldDiff] = field(default_factory=list)  # specials and flags
    first_token: tuple[int, str, str] | None = None  # (id, A's text, B's text)
    first_type: tuple[int, str, str] | None = None  # (id, A's GGUF token type, B's)
    merges: tuple[int, int] = (0, 0)
    first_merge: tuple[int, str, str] | None = None  # (rank, A's, B's)
    probes: ProbeCheck | None = None  # None: a side has no tokenizer

    @property
    def differs(self) -> bool:
        sizes = self.a_size != self.b_size or self.merges[0] != self.merges[1]
        encodes = self.probes is not None and bool(self.probes.differ)
        vocab = bool(self.fields or self.first_token or self.first_type or self.first_merge)
        return sizes or vocab or encodes

    @property
    def verified(self) -> bool:
        return self.probes is None or not self.probes.problems


@dataclass(frozen=True, slots=True)
class TensorDiff:
    name: str  # canonical
    kind: str  # "missing" (in B), "extra" (in B), "shape", "type", "tied" (output.weight against token_embd),
    # "stored" (rope_freqs.weight on one side, the same scaling in the other's config)
    a: str  # "Q4_K [576, 49152]" or "" when absent
    b: str


@dataclass(frozen=True, slots=True)
class ModelDiff:
    a: str  # paths as given
    b: str
    formats: tuple[str, str]
    architectures: tuple[str, str]
    config: list[FieldDiff]
    tokenizer: TokenizerDiff
    tensors: list[TensorDiff]
    tensor_counts: tuple[int, int]
    data: DataCheck

    @property
    def math_config(self) -> list[FieldDiff]:
        return [d for d in self.config if not d.storage]

    @property
    def differs(self) -> bool:
        """A difference that changes what the models compute (types only change precision)."""
        structural = any(t.kind not in STORAGE_KINDS for t in self.tensors)
        return bool(self.math_config) or self.tokenizer.differs or structural or self.data.differs

    @property
    def verdict(self) -> str:
        """One of VERDICTS: "same" only when nothing was left uncompared."""
        if self.differs:
            return "differ"
        return "same" if self.tokenizer.verified and not self.data.skipped else "unverified"


def is_model(path: Path) -> bool:
    """A checkpoint apr reads (a trace directory or an APRT stage file is not)."""
    try:
        detect_format(path)
    except AprError:
        return False
    return True


def diff_models(
    a: Model, b: Model, *, data: bool = True, progress: ProgressFactory | None = None
) -> ModelDiff:
    """Config, tokenizer, tensor-set and (unless `data` is False) tensor-data differences of two opened
    models; `progress(label, tensors)` hears of each tensor whose data is compared.

    >>> diff_models(open_model("a.apr"), open_model("b.apr")).verdict  # doctest: +SKIP
    'same'
    """
    if data:
        on_tensor = None if progress is None else progress("tensor data", len(paired_names(a, b)))
        found = compare_data(a, b, on_tensor)
    else:
        found = skip_data(a, b)
    config, tensors = diff_configs(a.config, b.config), _diff_tensors(a, b)
    if (why := _rope_freqs_storage(a, b)) is not None:  # Llama 3 scaling as a tensor on one side
        config = [replace(d, storage=why) if d.name.startswith("rope_scaling.") else d for d in config]
        tensors = [replace(t, kind="stored") if t.name == ROPE_FREQS else t for t in tensors]
    return ModelDiff(
        str(a.path),
        str(b.path),
        (a.format_name, b.format_name),
        (a.config.architecture, b.config.architecture),
        config,
        diff_tokenizers(a.tokenizer_spec(), b.tokenizer_spec()),
        tensors,
        (len(a.tensors()), len(b.tensors())),
        found,
    )


def _rope_freqs_storage(a: Model, b: Model) -> str | None:
    """Why the rope_scaling differences are storage only, when one side stores Llama 3's scaling as the
    rope_freqs tensor (a GGUF: no factor, no original context) and it equals, to float32 rounding, the
    divisors the other side's rope_scaling gives (as llama.cpp's converter computes them); else None."""
    for x, y, side in ((a, b, "A"), (b, a, "B")):
        sx, sy = x.config.rope_scaling, y.config.rope_scaling
        held = any(t.name == ROPE_FREQS for t in x.tensors())
        if not (sx.freq_factors and sy.kind == "llama3" and not sy.freq_factors and held):
            continue
        want = rope_freqs(y.config)
        got = x.read(ROPE_FREQS)
        if (
            want is not None
            and got.shape == want.shape
            and np.allclose(got, want, rtol=ROPE_FREQS_RTOL, atol=0.0)
        ):
            return f"Llama 3 scaling stored as {side}'s rope_freqs tensor, equal to the other's rope_scaling"
    return None


def diff_configs(a: ModelConfig, b: ModelConfig) -> list[FieldDiff]:
    out = []
    for f in fields(ModelConfig):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, RopeScaling):
            out += [
                FieldDiff(f"rope_scaling.{g.name}", x, y, STORAGE_FIELDS.get(f"rope_scaling.{g.name}", ""))
                for g in fields(RopeScaling)
                if not _same(x := getattr(va, g.name), y := getattr(vb, g.name))
            ]
        elif not _same(va, vb):
            pa, pb = (v.value if hasattr(v, "value") else v for v in (va, vb))
            out.append(FieldDiff(f.name, pa, pb, STORAGE_FIELDS.get(f.name, "") or _effective(f.name, a, b)))
    return out


def _effective(name: str, a: ModelConfig, b: ModelConfig) -> str:
    """Why a difference in `name` is storage only (the forward pass uses the same value), or ""."""
    if name not in EFFECTIVE:
        return ""
    value, why = EFFECTIVE[name]
    return why if _same(float(value(a)), float(value(b))) else ""


def _same(a: Any, b: Any) -> bool:
    """Equal; floats when equal as float32 (GGUF stores them so: 1e-6 reads back as 9.99999997e-07)."""
    if isinstance(a, float) and isinstance(b, float):
        return bool(np.float32(a) == np.float32(b))
    return bool(a == b)


def diff_tokenizers(a: TokenizerSpec | None, b: TokenizerSpec | None) -> TokenizerDiff:
    if a is None or b is None:
        return TokenizerDiff(None if a is None else len(a.tokens), None if b is None else len(b.tokens))
    # an HF tokenizer.json has no GGUF token types, no space-prefix flag, and SentencePiece merges a GGUF
    # vocab leaves out: those are compared only between two vocabularies that both store them
    both_gguf = HF_TOKENIZER not in (a.model, b.model)
    keys = TOKENIZER_FIELDS if both_gguf else tuple(k for k in TOKENIZER_FIELDS if k != "add_space_prefix")
    merges = both_gguf or (bool(a.merges) and bool(b.merges))
    return TokenizerDiff(
        len(a.tokens),
        len(b.tokens),
        [FieldDiff(k, x, y) for k in keys if (x := getattr(a, k)) != (y := getattr(b, k))],
        _first_difference(a.tokens, b.tokens),
        _first_type_difference(a, b) if both_gguf else None,
        (len(a.merges), len(b.merges)) if merges else (0, 0),
        _first_difference(a.merges, b.merges) if merges else None,
        probe_tokenizers(a, b),
    )


def _first_type_difference(a: TokenizerSpec, b: TokenizerSpec) -> tuple[int, str, str] | None:
    """The first token whose type makes llama.cpp treat it differently, as (id, A's GGUF type, B's): the
    types compared as the attributes llama.cpp acts on, after its fix-ups by name (an "<|endoftext|>"
    becomes CONTROL whatever its type), a CONTROL token's NORMAL or USER_DEFINED bit aside (with CONTROL
    set, matching it in text, skipping it without parse_special and its piece go by CONTROL alone)."""
    try:
        acted = [_acted_on(s) for s in (a, b)]
    except AprError:  # a malformed type array: compare what is stored
        return _first_difference(a.token_types, b.token_types)
    found = _first_difference(*acted)
    if found is None:
        return None
    i = found[0]
    ta, tb = (str(s.token_types[i]) if i < len(s.token_types) else "" for s in (a, b))
    return i, ta, tb


def _acted_on(spec: TokenizerSpec) -> list[int]:
    attrs = token_attrs(spec.tokens, spec.token_types, spec.fim_ids.keys())
    return [a & (CONTROL | KEPT_WITH_CONTROL) if a & CONTROL else a for a in attrs]


def _first_difference(a: Any, b: Any) -> tuple[int, str, str] | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i, str(x), str(y)
    return None  # a longer list shows as a different size


def _describe(t: Any) -> str:
    return f"{t.qtype.name} {list(t.shape)}"


def _diff_tensors(a: Model, b: Model) -> list[TensorDiff]:
    ta, tb = {t.name: t for t in a.tensors()}, {t.name: t for t in b.tensors()}
    out = []
    if (tied := tied_lm_head(a, b)) is not None:  # one side's output.weight is the other's token_embd
        a_side, b_side = (f"{n} {_describe(x[n])}" for n, x in zip(tied, (ta, tb), strict=True))
        out.append(TensorDiff(OUTPUT, "tied", a_side, b_side))
        ta, tb = ({n: t for n, t in x.items() if n != OUTPUT} for x in (ta, tb))
    for name, t in ta.items():
        other = tb.get(name)
        if other is None:
            out.append(TensorDiff(name, "missing", _describe(t), ""))
        elif t.shape != other.shape:
            out.append(TensorDiff(name, "shape", _describe(t), _describe(other)))
        elif t.qtype != other.qtype:
            out.append(TensorDiff(name, "type", _describe(t), _describe(other)))
    out += [TensorDiff(n, "extra", "", _describe(t)) for n, t in tb.items() if n not in ta]
    return out
