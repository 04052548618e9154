"""GGUF headers read through a byte-range reader; the tensor data are never read.

:func:`read_header` parses a GGUF header (v2/v3) through ``read(offset, length) -> bytes`` (a local
file or HTTP range requests), reading only what the parser needs in ``chunk_bytes`` pieces and
skipping long arrays (tokenizer tables) by seeking. Every count, array length, nesting level and
tensor shape is checked before anything is allocated, and the metadata by the one validator,
:mod:`optimizer.formats.gguf_meta`. :func:`read_header_file` is the local-file shortcut;
:func:`config_from_header` turns a header into the JSON-like config a variant carries. The memory
rules over the result live in :mod:`optimizer.formats.gguf`.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import WeightsHeaderError
from optimizer.formats.gguf_meta import (
    MAX_KEPT_NUMERIC,
    MAX_KEPT_OTHER,
    MAX_TENSOR_DIMS,
    KeepBudget,
    check_alignment,
    check_array,
    check_metadata,
    check_tensor,
)

#: A byte-range reader: ``read(offset, length)`` returns up to ``length`` bytes from ``offset``.
RangeReader = Callable[[int, int], bytes]

GGUF_MAGIC = b"GGUF"
#: Headers larger than this are refused (real ones are a few MB: the tokenizer dominates).
MAX_HEADER_BYTES = 256 * 2**20
DEFAULT_CHUNK_BYTES = 2 * 2**20

# ggml type id -> (name, block size in elements, bytes per block). Mirrors gguf.constants.GGML_QUANT_SIZES
# (checked in tests) so that header reading needs no numpy. Q8_1 (a matmul-only type, never stored) is left out.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
GGML_TYPE_IDS: dict[str, int] = {name.lower(): tid for tid, (name, _, _) in GGML_TYPES.items()}

#: llama_ftype (``general.file_type``) -> label, for the common ones.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

# GGUF metadata value types: id -> struct format (None: string / array)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


# ----- header reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF header. ``shape`` is in ggml order (fastest dimension first)."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]


@dataclass(frozen=True)
class GgufHeader:
    """A parsed GGUF header. ``kv`` holds scalars, strings and short arrays; long arrays are
    replaced by their length under ``kv_array_len``. ``data_offset`` is where tensor data start."""

    version: int
    kv: Mapping[str, Any]
    kv_array_len: Mapping[str, int]
    tensors: tuple[GgufTensor, ...]
    data_offset: int
    header_bytes_read: int


class _Cursor:
    """Sequential reads over a range reader, fetched in ``chunk`` pieces; skips without fetching."""

    def __init__(self, read: RangeReader, chunk: int, name: str) -> None:
        self._read, self._chunk, self._name = read, chunk, name
        self.pos = 0
        self._buf = b""
        self._buf_start = 0
        self.fetched = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > MAX_HEADER_BYTES:
            raise WeightsHeaderError(f"{self._name}: GGUF header larger than {MAX_HEADER_BYTES // 2**20} MiB")
        end = self.pos + n
        if not (self._buf_start <= self.pos and end <= self._buf_start + len(self._buf)):
            keep = self._buf[self.pos - self._buf_start:] if self._buf_start <= self.pos < self._buf_start + len(self._buf) else b""
            want = max(self._chunk, n - len(keep))
            got = self._read(self.pos + len(keep), want)
            self.fetched += len(got)
            self._buf, self._buf_start = keep + got, self.pos
            if end > self._buf_start + len(self._buf):
                raise WeightsHeaderError(f"{self._name}: truncated GGUF header")
        out = self._buf[self.pos - self._buf_start:end - self._buf_start]
        self.pos = end
        return out

    def skip(self, n: int) -> None:
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    @property
    def name(self) -> str:
        return self._name

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 24:
            raise WeightsHeaderError(f"{self._name}: implausible GGUF string length {n}")
        return self.take(n).decode("utf-8", "replace")


def _value(c: _Cursor, vtype: int, key: str, kv_len: dict[str, int], budget: KeepBudget, depth: int = 0) -> Any:
    """One metadata value; arrays are checked (count, depth) before anything is read or skipped."""
    if vtype in _SCALAR:
        budget.spend(8)
        return c.unpack(_SCALAR[vtype])
    if vtype == _STRING:
        s = c.string()
        budget.spend(len(s))
        return s
    if vtype == _ARRAY:
        etype, count = c.unpack("<I"), c.unpack("<Q")
        size = struct.calcsize(_SCALAR[etype]) if etype in _SCALAR else None
        if etype not in _SCALAR and etype not in (_STRING, _ARRAY):
            raise WeightsHeaderError(f"{c.name}: unknown GGUF value type {etype} in {key!r}")
        check_array(name=c.name, key=key, etype=etype, count=count, elem_bytes=size, depth=depth + 1,
                    remaining=MAX_HEADER_BYTES - c.pos)
        keep = MAX_KEPT_NUMERIC if (size is not None and not key.startswith("tokenizer.")) else MAX_KEPT_OTHER
        if count > keep:
            kv_len[key] = count
            if size is not None:
                c.skip(count * size)
            elif etype == _STRING:
                for _ in range(count):
                    c.skip(c.unpack("<Q"))
            else:
                raise WeightsHeaderError(f"{c.name}: GGUF key {key!r} holds a long array of arrays")
            return None
        return [_value(c, etype, key, kv_len, budget, depth + 1) for _ in range(count)]
    raise WeightsHeaderError(f"{c.name}: unknown GGUF value type {vtype} for {key!r}")


def read_header(read: RangeReader, *, name: str = "<gguf>", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> GgufHeader:
    """Parse a GGUF header (v2/v3) through a byte-range reader; tensor data are never read.

    ``read(offset, length)`` may return fewer bytes only at the end of the file. Remote use:
    wrap HTTP ``Range: bytes=a-b`` requests (``chunk_bytes`` per request, 2 MiB by default).
    Counts, array lengths, nesting and tensor shapes are checked before anything is allocated,
    and the metadata by :func:`optimizer.formats.gguf_meta.check_metadata`.

    Raises:
        WeightsHeaderError: not a GGUF file, truncated, malformed, or implausible.
    """
    c = _Cursor(read, chunk_bytes, name)
    if c.take(4) != GGUF_MAGIC:
        raise WeightsHeaderError(f"{name}: not a GGUF file (bad magic)")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise WeightsHeaderError(f"{name}: unsupported GGUF version {version}")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise WeightsHeaderError(f"{name}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys)")
    kv: dict[str, Any] = {}
    kv_len: dict[str, int] = {}
    budget = KeepBudget(name=name)
    for _ in range(n_kv):
        key = c.string()
        budget.spend(len(key) + 64)
        if key in kv or key in kv_len:
            raise WeightsHeaderError(f"{name}: GGUF key {key[:80]!r} appears twice")
        kv[key] = _value(c, c.unpack("<I"), key, kv_len, budget)
        if kv[key] is None:
            del kv[key]
    check_metadata(kv, kv_len, name=name)
    tensors: list[GgufTensor] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        tname = c.string()
        budget.spend(len(tname) + 128)
        if tname in seen:
            raise WeightsHeaderError(f"{name}: tensor {tname[:80]!r} appears twice")
        seen.add(tname)
        n_dims = c.unpack("<I")
        if n_dims > MAX_TENSOR_DIMS:
            raise WeightsHeaderError(f"{name}: tensor {tname!r} has {n_dims} dimensions")
        shape = tuple(c.unpack("<Q") for _ in range(n_dims))
        type_id, offset = c.unpack("<I"), c.unpack("<Q")
        if type_id not in GGML_TYPES:
            raise WeightsHeaderError(f"{name}: tensor {tname!r} has unknown ggml type {type_id}")
        _, block, size = GGML_TYPES[type_id]
        n = check_tensor(name=name, tname=tname, shape=shape, block=block)
        tensors.append(GgufTensor(name=tname, type_id=type_id, shape=shape, offset=offset, nbytes=-(-n // block) * size))
    align = check_alignment(kv.get("general.alignment", 32), name=name)
    data_offset = -(-c.pos // align) * align
    return GgufHeader(version=version, kv=kv, kv_array_len=kv_len, tensors=tuple(tensors),
                      data_offset=data_offset, header_bytes_read=c.fetched)


def http_range_reader(url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> RangeReader:
    """A :data:`RangeReader` over HTTP ``Range: bytes=a-b`` GET requests (redirects followed).

    ``headers`` may carry an ``Authorization`` header; it is sent, never logged. A server that
    ignores ``Range`` (status 200) is refused rather than downloading the whole file.
    """
    import urllib.error
    import urllib.request

    def read(offset: int, length: int) -> bytes:
        req = urllib.request.Request(url, headers={**(headers or {}), "Range": f"bytes={offset}-{offset + length - 1}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (http(s) URL from a source)
                if resp.status == 200 and offset + length < int(resp.headers.get("Content-Length") or 0):
                    raise WeightsHeaderError(f"{url.split('?')[0]}: server ignores HTTP range requests")
                data: bytes = resp.read(length)
                return data
        except urllib.error.HTTPError as e:
            if e.code == 416:  # range past the end of the file
                return b""
            raise WeightsHeaderError(f"{url.split('?')[0]}: HTTP {e.code} reading the GGUF header") from None
        except (urllib.error.URLError, OSError) as e:
            raise WeightsHeaderError(f"{url.split('?')[0]}: cannot read the GGUF header ({e})") from None

    return read


def read_header_file(path: Path, *, chunk_bytes: int = 1 << 20) -> GgufHeader:
    """:func:`read_header` over a local file."""
    try:
        with open(path, "rb") as f:
            def read(offset: int, length: int) -> bytes:
                f.seek(offset)
                return f.read(length)

            return read_header(read, name=str(path), chunk_bytes=chunk_bytes)
    except OSError as e:
        raise WeightsHeaderError(f"{path}: cannot read ({e.strerror})") from None


def config_from_header(header: GgufHeader) -> dict[str, Any]:
    """The JSON-like config a GGUF :class:`~optimizer.variant.Variant` carries: the header's scalar
    keys under ``"gguf"`` plus ``architecture``, ``vocab_size`` and ``max_position_embeddings``."""
    kv = {k: v for k, v in header.kv.items() if not k.startswith("tokenizer.ggml.") or not isinstance(v, list)}
    arch = str(kv.get("general.architecture", ""))
    vocab = header.kv_array_len.get("tokenizer.ggml.tokens") or len(header.kv.get("tokenizer.ggml.tokens") or []) \
        or int(kv.get(f"{arch}.vocab_size", 0) or 0)
    return {
        "gguf": kv,
        "architecture": arch,
        "vocab_size": vocab,
        "max_position_embeddings": int(kv.get(f"{arch}.context_length", 4096) or 4096),
    }


def file_type_label(kv: Mapping[str, Any], fallback: str) -> str:
    """``Q4_K_M`` from ``general.file_type``, else a quant name found in ``fallback``, else ``fallback``."""
    ft = kv.get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPES:
        return FILE_TYPES[ft]
    m = re.search(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?:$|[-_.])", fallback)
    from optimizer.textsafe import strip_controls

    return m.group(1).upper() if m else strip_controls(fallback)
