"""The one validator of GGUF metadata (as ``optimizer.arch`` is for config.json).

A GGUF header is untrusted input: any key may hold any type, any array any length. Two layers:

* **While reading** (``optimizer.formats.gguf.read_header`` calls these): counts and sizes are
  checked *before* anything is allocated or skipped -- :func:`check_array` (element count x
  element size within the header cap, nesting at most :data:`MAX_DEPTH`), :func:`check_tensor`
  (at most 4 dimensions, each and their product bounded, rows whole blocks), and a budget of
  :data:`MAX_KEPT_BYTES` for everything kept in memory. :func:`check_metadata` then checks every
  key of :data:`INT_RULES` that is present (type, range, per-layer array length against
  ``block_count``) and ``general.alignment``, so a 1 kB file claiming 10^8 layers is refused in
  microseconds, locally or from a Hub.
* **When sizing** (``model_from_config``): :func:`hparams` returns the validated integers the
  memory rules use, with the required ones present.

Every refusal is one :class:`~optimizer.errors.WeightsHeaderError` line naming the file and key.
Numbers are element counts or tokens (never bytes) unless a name says otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optimizer.errors import UnsupportedArchitectureError, WeightsHeaderError

MAX_LAYERS = 4096
MAX_DIM = 1 << 22  # hidden, FFN, vocab (4M)
MAX_HEADS = 65536
MAX_CTX = 1 << 26  # 64M tokens
MAX_VOCAB = 1 << 23
#: Arrays of arrays are allowed one level deep (none of llama.cpp's keys uses more).
MAX_DEPTH = 2
#: Dimensions of a tensor (``GGML_MAX_DIMS``) and the largest element count of one tensor / one dim.
MAX_TENSOR_DIMS = 4
MAX_NUMEL = 1 << 42
#: Bytes of keys, strings and array elements kept in memory from one header (the rest is skipped).
MAX_KEPT_BYTES = 32 * 2**20
#: Numeric arrays at most this long are kept (per-layer hyper-parameters); longer ones are skipped.
MAX_KEPT_NUMERIC = MAX_LAYERS
#: Other arrays (strings: tokenizer tables) at most this long are kept.
MAX_KEPT_OTHER = 64

# key suffix (after "<arch>.") -> (lowest, highest, may be a per-layer array)
INT_RULES: dict[str, tuple[int, int, bool]] = {
    "block_count": (1, MAX_LAYERS, False),
    "context_length": (1, MAX_CTX, False),
    "embedding_length": (1, MAX_DIM, False),
    "feed_forward_length": (0, MAX_DIM, True),
    "expert_feed_forward_length": (0, MAX_DIM, False),
    "expert_count": (0, MAX_HEADS, False),
    "expert_used_count": (0, MAX_HEADS, False),
    "vocab_size": (1, MAX_VOCAB, False),
    "attention.head_count": (0, MAX_HEADS, True),
    "attention.head_count_kv": (0, MAX_HEADS, True),
    "attention.key_length": (1, MAX_HEADS, False),
    "attention.value_length": (1, MAX_HEADS, False),
    "attention.sliding_window": (0, MAX_CTX, False),
    "rope.dimension_count": (0, MAX_HEADS, False),
}


@dataclass
class KeepBudget:
    """Bytes kept in memory so far while reading one header (see :data:`MAX_KEPT_BYTES`)."""

    name: str
    used: int = 0

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > MAX_KEPT_BYTES:
            raise WeightsHeaderError(f"{self.name}: GGUF metadata keeps more than {MAX_KEPT_BYTES // 2**20} MiB "
                                     "of keys and values (not a real model header)")


def check_array(*, name: str, key: str, etype: int, count: int, elem_bytes: int | None, depth: int,
                remaining: int) -> None:
    """Refuse an array before reading it: too deep, or more elements than the header could hold.

    ``elem_bytes`` is the size of one scalar element (None for strings/arrays: at least 8 bytes
    each, their length field); ``remaining`` is how many header bytes may still be read.
    """
    if depth > MAX_DEPTH:
        raise WeightsHeaderError(f"{name}: GGUF key {key!r} nests arrays more than {MAX_DEPTH} deep")
    least = count * (elem_bytes if elem_bytes is not None else (12 if etype == 9 else 8))
    if least > remaining:
        raise WeightsHeaderError(f"{name}: GGUF key {key!r} claims {count} elements, more than the header can hold")


def check_tensor(*, name: str, tname: str, shape: tuple[int, ...], block: int) -> int:
    """The element count of a tensor, after checking its dimensions (bounded, whole blocks)."""
    if len(shape) > MAX_TENSOR_DIMS:
        raise WeightsHeaderError(f"{name}: tensor {tname!r} has {len(shape)} dimensions (at most {MAX_TENSOR_DIMS})")
    n = 1
    for d in shape:
        if not 0 <= d <= MAX_NUMEL:
            raise WeightsHeaderError(f"{name}: tensor {tname!r} has an implausible dimension")
        n *= d
        if n > MAX_NUMEL:
            raise WeightsHeaderError(f"{name}: tensor {tname!r} is implausibly large (more than 2^42 elements)")
    if shape and shape[0] % block:
        raise WeightsHeaderError(f"{name}: tensor {tname!r} rows of {shape[0]} elements are not whole blocks of {block}")
    return n


def _int_value(v: Any, *, name: str, key: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        shown = repr(v)[:40]
        raise WeightsHeaderError(f"{name}: GGUF key {key!r} must be an integer, got {shown}")
    if not lo <= v <= hi:
        raise WeightsHeaderError(f"{name}: GGUF key {key!r} = {v} is out of range [{lo}, {hi}]")
    return v


def _checked(kv: Mapping[str, Any], kv_len: Mapping[str, int], key: str, rule: tuple[int, int, bool], *,
             name: str, n_layer: int | None) -> int | tuple[int, ...] | None:
    """The validated value of ``key`` (an int, a per-layer tuple, or None when absent)."""
    lo, hi, per_layer = rule
    if key in kv_len and key not in kv:  # an array too long to keep
        raise WeightsHeaderError(f"{name}: GGUF key {key!r} is an array of {kv_len[key]} elements "
                                 f"(at most {MAX_KEPT_NUMERIC})")
    if key not in kv:
        return None
    v = kv[key]
    if isinstance(v, list):
        if not per_layer:
            raise WeightsHeaderError(f"{name}: GGUF key {key!r} must be an integer, got an array")
        if n_layer is not None and len(v) != n_layer:
            raise WeightsHeaderError(f"{name}: GGUF key {key!r} lists {len(v)} values for {n_layer} layers")
        if not v:
            raise WeightsHeaderError(f"{name}: GGUF key {key!r} is an empty array")
        return tuple(_int_value(x, name=name, key=key, lo=lo, hi=hi) for x in v)
    return _int_value(v, name=name, key=key, lo=lo, hi=hi)


def check_alignment(v: Any, *, name: str) -> int:
    """``general.alignment``: a power of two, 1 .. 2^20 bytes (llama.cpp refuses others)."""
    a = _int_value(v, name=name, key="general.alignment", lo=1, hi=1 << 20)
    if a & (a - 1):
        raise WeightsHeaderError(f"{name}: GGUF key 'general.alignment' = {a} is not a power of two")
    return a


def check_metadata(kv: Mapping[str, Any], kv_len: Mapping[str, int], *, name: str) -> None:
    """Check every present key of :data:`INT_RULES` for the header's architecture, and the alignment.

    Raises:
        WeightsHeaderError: a wrong type, a value out of range, a per-layer array whose length is
            not ``block_count``.
    """
    if "general.alignment" in kv:
        check_alignment(kv["general.alignment"], name=name)
    arch = kv.get("general.architecture")
    if arch is None:
        return
    if not isinstance(arch, str) or not arch or len(arch) > 64:
        raise WeightsHeaderError(f"{name}: GGUF key 'general.architecture' is not a short name")
    p = arch + "."
    nl = _checked(kv, kv_len, p + "block_count", INT_RULES["block_count"], name=name, n_layer=None)
    n_layer = nl if isinstance(nl, int) else None
    for suffix, rule in INT_RULES.items():
        _checked(kv, kv_len, p + suffix, rule, name=name, n_layer=n_layer)


@dataclass(frozen=True)
class Hparams:
    """Validated hyper-parameters the memory rules need (element counts and tokens)."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int


def hparams(config: Mapping[str, Any], *, name: str = "GGUF header") -> Hparams:
    """The validated hyper-parameters of a GGUF variant's config (``config["gguf"]`` holds the keys).

    Raises:
        UnsupportedArchitectureError: no architecture, or a required key is missing.
        WeightsHeaderError: a key has a wrong type, is out of range, or has a wrong array length.
    """
    kv = config.get("gguf")
    if not isinstance(kv, Mapping):
        raise UnsupportedArchitectureError(f"{name}: no GGUF metadata")
    arch = kv.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise UnsupportedArchitectureError(f"{name}: GGUF header has no general.architecture")
    check_metadata(kv, {}, name=name)
    p = arch + "."

    def one(suffix: str, default: int | None = None, n_layer: int | None = None) -> int:
        v = many(suffix, default, n_layer)
        return max(v) if isinstance(v, tuple) else v

    def many(suffix: str, default: int | tuple[int, ...] | None, n_layer: int | None) -> int | tuple[int, ...]:
        v = _checked(kv, {}, p + suffix, INT_RULES[suffix], name=name, n_layer=n_layer)
        if v is None:
            if default is None:
                raise UnsupportedArchitectureError(f"{name}: GGUF header lacks {p + suffix!r}")
            return default
        return v

    n_layer = one("block_count")
    n_embd = one("embedding_length")
    head = many("attention.head_count", None, n_layer)
    n_head = max(head) if isinstance(head, tuple) else head
    if n_head < 1:
        raise WeightsHeaderError(f"{name}: GGUF key {p + 'attention.head_count'!r} has no attention head")
    hkv = many("attention.head_count_kv", head, n_layer)
    vocab = config.get("vocab_size") or one("vocab_size", 0)
    n_vocab = _int_value(vocab, name=name, key="vocab size (tokenizer.ggml.tokens)", lo=0, hi=MAX_VOCAB)
    if n_vocab <= 0:
        raise UnsupportedArchitectureError(f"{name}: GGUF header has no vocabulary size (tokenizer.ggml.tokens)")
    head_dim = max(n_embd // n_head, 1)
    return Hparams(
        arch=arch, n_layer=n_layer, n_embd=n_embd, n_ff=one("feed_forward_length", 4 * n_embd, n_layer),
        n_head=n_head, n_head_kv=hkv if isinstance(hkv, tuple) else (hkv,) * n_layer,
        head_dim_k=one("attention.key_length", head_dim), head_dim_v=one("attention.value_length", head_dim),
        n_vocab=n_vocab, n_ctx_train=one("context_length", 4096), n_swa=one("attention.sliding_window", 0),
    )
