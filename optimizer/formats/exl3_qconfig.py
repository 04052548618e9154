"""Read an EXL3 ``quantization_config.json``: every stored tensor of the text model without a shard header.

exllamav3's converter writes it last (``conversion/quant_config.py``): the ``quantization_config`` block
plus ``tensor_storage``, one entry per *leaf* module with ``stored_tensors: {name: {shape, n_bytes,
dtype}}`` (dtype spelled ``torch.float16``), and for EXL3 linears ``quant_format: "exl3"`` and
``bits_per_weight``. It lists only what the text model loads (a vision tower in the shards is absent),
so bytes from it and from the headers agree for every loaded tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from optimizer.errors import ModelConfigError
from optimizer.variant import TensorInfo

#: ``str(torch.dtype)`` -> (safetensors dtype code, bytes per element).
_DTYPES = {
    "torch.float16": ("F16", 2), "torch.bfloat16": ("BF16", 2), "torch.float32": ("F32", 4),
    "torch.int16": ("I16", 2), "torch.int32": ("I32", 4), "torch.uint8": ("U8", 1), "torch.int8": ("I8", 1),
    "torch.int64": ("I64", 8), "torch.float64": ("F64", 8), "torch.uint32": ("U32", 4),
}

_MAX_TENSORS = 2_000_000
_MAX_DIM = 1 << 40


def tensors_from_quantization_config(doc: Any, *, name: str = "quantization_config.json") -> tuple[TensorInfo, ...]:
    """Every stored tensor listed in ``tensor_storage``, with its exact byte count.

    Raises:
        ModelConfigError: the document is not a quantization_config.json, or an entry is malformed
            (unknown dtype, negative or absurd shape, ``n_bytes`` that disagrees with the shape).
    """
    if not isinstance(doc, Mapping) or doc.get("quant_method") != "exl3":
        raise ModelConfigError(f"{name}: not an EXL3 quantization_config.json (quant_method != 'exl3')")
    storage = doc.get("tensor_storage")
    if not isinstance(storage, Mapping) or not storage:
        raise ModelConfigError(f"{name}: no 'tensor_storage' table")
    out: list[TensorInfo] = []
    for module, entry in storage.items():
        stored = entry.get("stored_tensors") if isinstance(entry, Mapping) else None
        if not isinstance(stored, Mapping):
            raise ModelConfigError(f"{name}: module {str(module)[:80]!r} has no 'stored_tensors'")
        for tname, info in stored.items():
            out.append(_tensor(str(tname), info, name=name))
            if len(out) > _MAX_TENSORS:
                raise ModelConfigError(f"{name}: more than {_MAX_TENSORS} tensors")
    return tuple(out)


def _tensor(tname: str, info: Any, *, name: str) -> TensorInfo:
    where = f"{name}: tensor {tname[:80]!r}"
    if not isinstance(info, Mapping):
        raise ModelConfigError(f"{where} is not an object")
    dt, shape, nbytes = info.get("dtype"), info.get("shape"), info.get("n_bytes")
    if dt not in _DTYPES:
        raise ModelConfigError(f"{where}: unknown dtype {str(dt)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > 8 or any(
        isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= _MAX_DIM for d in shape
    ):
        raise ModelConfigError(f"{where}: bad shape")
    code, size = _DTYPES[dt]
    expect = math.prod(shape) * size
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes != expect:
        raise ModelConfigError(f"{where}: n_bytes {nbytes!r} does not match shape {shape} x {size} B")
    return TensorInfo(name=tname, dtype=code, shape=tuple(shape), nbytes=nbytes)
