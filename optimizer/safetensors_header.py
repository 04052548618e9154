"""Read safetensors headers (never tensor data) and reject hostile ones.

A safetensors file starts with an 8-byte little-endian header length ``n``, then ``n`` bytes of JSON
mapping tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the end of the header), plus an optional ``__metadata__`` entry.

Files that hold only the header (no tensor data) are accepted: exl2opt ships such "header-only"
files as metadata of real models, and ExLlamaV2's own ``weight_footprint()`` reads only the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

from optimizer.errors import WeightsHeaderError
from optimizer.header_scan import scan_header
from optimizer.variant import TensorInfo

#: Bytes per element of every safetensors dtype.
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

#: Largest header accepted, in bytes (huggingface_hub uses 25 MB; real exl2 headers are < 2 MB).
MAX_HEADER_BYTES = 25_000_000
#: Largest element count accepted for a single tensor (2**40: far beyond any real model).
MAX_NUMEL = 2**40
#: Most tensors accepted in one shard (a 235B MoE exl2 shard holds ~12k; 30B-A3B ~46k per shard).
#: Counted entry by entry by the streaming reader (``optimizer.header_scan``), escaped keys included;
#: nothing but one small record per tensor is ever built.
MAX_TENSORS = 250_000


def header_length(prefix: bytes, *, name: str, file_size: int | None = None) -> int:
    """Decode and check the 8-byte header length at the start of ``prefix``."""
    if len(prefix) < 8:
        raise WeightsHeaderError(f"{name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > MAX_HEADER_BYTES:
        raise WeightsHeaderError(f"{name}: safetensors header length {n} is not plausible")
    if file_size is not None and n + 8 > file_size:
        raise WeightsHeaderError(
            f"{name}: safetensors header length {n} is larger than the file ({file_size} bytes)"
        )
    return n


def parse_header_json(raw: bytes, *, name: str, data_size: int | None = None) -> tuple[TensorInfo, ...]:
    """Parse and validate the JSON header; return tensors sorted by data offset.

    ``data_size`` is the number of bytes after the header (file size - 8 - header length). When the
    file holds data (``data_size > 0``) every tensor must lie inside it; header-only files
    (``data_size`` 0 or None) are not checked against their data.

    Raises:
        WeightsHeaderError: invalid JSON, wrong types, unknown dtype, size/shape mismatch,
            overlapping or negative offsets, offsets past the end of the data.
    """
    if len(raw) > MAX_HEADER_BYTES:
        raise WeightsHeaderError(f"{name}: safetensors header length {len(raw)} is not plausible")
    if raw.count(b"{") > MAX_TENSORS + 1:
        # every entry needs one '{' (escapes cannot spell it), so only here can there be too many:
        # count them exactly first, keeping nothing, before building any record
        for _ in scan_header(raw, name=name, max_tensors=MAX_TENSORS, count_only=True):
            pass
    spans: list[tuple[int, int, TensorInfo]] = []
    for key, dtype, shape, offsets in scan_header(raw, name=name, max_tensors=MAX_TENSORS):
        spans.append(_parse_entry(key, {"dtype": dtype, "shape": shape, "data_offsets": offsets}, name=name))
    spans.sort(key=lambda s: (s[0], s[1]))
    prev_end = 0
    for begin, end, info in spans:
        if begin < prev_end:
            raise WeightsHeaderError(f"{name}: tensor {info.name!r} overlaps the previous tensor")
        prev_end = end
    if data_size and prev_end > data_size:
        raise WeightsHeaderError(
            f"{name}: tensor data ends at byte {prev_end} but the file holds only {data_size} bytes of data"
        )
    return tuple(s[2] for s in spans)


def _parse_entry(key: str, entry: Any, *, name: str) -> tuple[int, int, TensorInfo]:
    if not isinstance(entry, dict):
        raise WeightsHeaderError(f"{name}: header entry {key!r} is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise WeightsHeaderError(f"{name}: tensor {key!r} has unknown dtype {dtype!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
    ):
        raise WeightsHeaderError(f"{name}: tensor {key!r} has an invalid shape")
    if (
        not isinstance(offs, list)
        or len(offs) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        or not 0 <= offs[0] <= offs[1]
    ):
        raise WeightsHeaderError(f"{name}: tensor {key!r} has invalid data_offsets")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise WeightsHeaderError(f"{name}: tensor {key!r} is implausibly large")
    nbytes = numel * DTYPE_BYTES[dtype]
    if offs[1] - offs[0] != nbytes:
        raise WeightsHeaderError(
            f"{name}: tensor {key!r} declares {offs[1] - offs[0]} bytes but its shape needs {nbytes}"
        )
    return offs[0], offs[1], TensorInfo(name=key, dtype=dtype, shape=tuple(shape), nbytes=nbytes)


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[TensorInfo, ...]:
    """Read the header of a local safetensors file; never reads tensor data."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = header_length(f.read(8), name=name, file_size=size)
            raw = f.read(n)
    except OSError as e:
        raise WeightsHeaderError(f"{name}: cannot read ({e.strerror or e})") from None
    if len(raw) != n:
        raise WeightsHeaderError(f"{name}: safetensors header is truncated")
    return parse_header_json(raw, name=name, data_size=size - 8 - n)


def write_header_only(path: str | os.PathLike[str], tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Write a header-only safetensors file (no data): ``{name: (dtype, shape)}``.

    Used to ship real models' metadata under ``studies/`` and to build test fixtures.
    """
    header: dict[str, Any] = {}
    offset = 0
    for tname, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
