"""A raw GGUF header writer for hostile-input tests: any key, any value type, any tensor shape.

``gguf_bytes`` writes exactly what it is given (no data section), so tests can produce headers the
``gguf`` package refuses to write: a ``block_count`` of type string, arrays nested 5,000 deep,
tensors of (2^64-1)^4 elements. ``tiny_llama_kv`` / ``tiny_llama_tensors`` are a valid starting point.
"""

from __future__ import annotations

import struct
from typing import Any

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q",
        F64: "<d"}


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value_bytes(vtype: int, value: Any) -> bytes:
    """``value`` encoded as GGUF type ``vtype``; an array value is ``(element type, [items])``."""
    if vtype in _FMT:
        return struct.pack(_FMT[vtype], value)
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(value_bytes(etype, x) for x in items)
    raise ValueError(vtype)


#: Pseudo type: the value is the already-encoded bytes of an array (written with type ARR).
RAW_ARR = -1


def nested_array(depth: int) -> bytes:
    """The encoded value of an array nested ``depth`` deep (innermost: one U8); use with RAW_ARR."""
    return struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", U8, 1) + b"\x01"


def gguf_bytes(kv: list[tuple[str, int, Any]], tensors: list[tuple[str, tuple[int, ...], int, int]] = (),  # type: ignore[assignment]
               *, version: int = 3, n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """A GGUF header: ``kv`` as (key, type, value); ``tensors`` as (name, shape, ggml type id, offset)."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, vtype, value in kv:
        if vtype == RAW_ARR:
            out += _str(key) + struct.pack("<I", ARR) + value
        else:
            out += _str(key) + struct.pack("<I", vtype) + value_bytes(vtype, value)
    for name, shape, type_id, offset in tensors:
        out += _str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        out += struct.pack("<IQ", type_id, offset)
    return out


def tiny_llama_kv(**override: tuple[int, Any] | None) -> list[tuple[str, int, Any]]:
    """A valid 2-layer llama header; ``override`` replaces (or with None removes) ``llama.<key>``
    values (dots written as ``__``: ``attention__head_count_kv=(ARR, (U32, [2]))``)."""
    base: dict[str, tuple[int, Any]] = {
        "block_count": (U32, 2), "context_length": (U32, 512), "embedding_length": (U32, 64),
        "feed_forward_length": (U32, 128), "attention.head_count": (U32, 4), "attention.head_count_kv": (U32, 2),
        "vocab_size": (U32, 320),
    }
    for k, v in override.items():
        key = k.replace("__", ".")
        if v is None:
            base.pop(key, None)
        else:
            base[key] = v
    return [("general.architecture", STR, "llama"), ("general.alignment", U32, 32)] + \
        [(f"llama.{k}", t, v) for k, (t, v) in base.items()]


Tensor = tuple[str, tuple[int, ...], int, int]


def tiny_llama_tensors(n_layer: int = 2, n_embd: int = 64, n_ff: int = 128, n_vocab: int = 320) -> list[Tensor]:
    """F16 tensors of a tiny llama (offsets are not checked by exl2opt's rules)."""
    t: list[tuple[str, tuple[int, ...], int, int]] = [("token_embd.weight", (n_embd, n_vocab), 1, 0)]
    for i in range(n_layer):
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, 32)), ("attn_v", (n_embd, 32)),
                            ("attn_output", (n_embd, n_embd)), ("ffn_up", (n_embd, n_ff)), ("ffn_down", (n_ff, n_embd))):
            t.append((f"blk.{i}.{name}.weight", shape, 1, 0))
    t += [("output_norm.weight", (n_embd,), 0, 0), ("output.weight", (n_embd, n_vocab), 1, 0)]
    return t
