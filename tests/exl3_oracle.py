"""Helpers for the exllamav3 1.6.5 oracle tests: loadable header-only EXL3 dirs and the library's numbers.

A model dir holds ``config.json`` (with an EXL3 ``quantization_config``) and one *sparse*
``model.safetensors``: the real header, the real codebook-marker values (the loader checks one per
file), and a hole of the full data size (no disk used). exllamav3's own Python code then builds,
loads on CPU (``load_method="python"``, import stubs from ``exl3_stubs``) and reports what every
module keeps. Nothing runs on import.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exl3_stubs import active, import_exllamav3

from optimizer.formats.exl3_synth import MUL1_MARKER, quantization_config, synthesize
from optimizer.safetensors_header import DTYPE_BYTES

Tensors = dict[str, tuple[str, tuple[int, ...]]]

#: The fields of a Gemma 3 ``preprocessor_config.json`` that exllamav3 reads.
GEMMA3_PREPROCESSOR = {"image_processor_type": "Gemma3ImageProcessor", "image_mean": [0.5, 0.5, 0.5],
                       "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 0.00392156862745098,
                       "size": {"height": 896, "width": 896}}


def write_sparse_safetensors(path: Path, tensors: Tensors, *, marker: int = MUL1_MARKER) -> None:
    """A safetensors file whose data is a hole except the int32 codebook markers."""
    header: dict[str, Any] = {}
    offset = 0
    markers: list[int] = []
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        if name.endswith((".mul1", ".mcg")):
            markers.append(offset)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        base = f.tell()
        for off in markers:
            f.seek(base + off)
            f.write(struct.pack("<I", marker))
        f.truncate(base + offset)


def write_exl3_dir(path: Path, config: dict[str, Any], *, bits: float = 4.0, head_bits: int = 6,
                   tensors: Tensors | None = None) -> Path:
    """``config.json`` with an EXL3 quantization_config and a sparse ``model.safetensors``."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg.setdefault("quantization_config", quantization_config(bits=bits, head_bits=head_bits))
    cfg.setdefault("hidden_act", "silu")
    (path / "config.json").write_text(json.dumps(cfg))
    if cfg.get("architectures") == ["Gemma3ForConditionalGeneration"]:  # exllamav3 reads it when parsing the config
        (path / "preprocessor_config.json").write_text(json.dumps(GEMMA3_PREPROCESSOR))
    write_sparse_safetensors(path / "model.safetensors",
                             tensors if tensors is not None else synthesize(cfg, bits=bits, head_bits=head_bits))
    return path


@dataclass(frozen=True)
class Exl3Oracle:
    """exllamav3's own numbers for a model dir, loaded on CPU (bytes)."""

    modules: dict[str, int]      # top-level module key -> bytes its tensors hold (markers excluded)
    prefer_cpu: dict[str, bool]  # module key -> caps["prefer_cpu"] (kept in system RAM)
    linears: int                 # EXL3 linears (one shared CPU marker each)
    storage_info: tuple[float, float, float]
    model: Any
    config: Any


def oracle_load(path: Path, *, prefix: str = "") -> Exl3Oracle:
    """``Config.from_directory`` -> ``Model.from_config`` -> ``model.load("cpu")``; per-module tensor bytes.

    Module keys lose the language-model ``prefix`` (Gemma 3: ``language_model.``). The codebook
    markers are the loader's shared CPU tensors (``loader.safetensors._codebook_markers``), never on
    a GPU; they are excluded by identity.
    """
    exl3 = import_exllamav3()
    import torch
    from exllamav3.loader import safetensors as st

    threads = torch.get_num_threads()
    with active():
        config = exl3.Config.from_directory(str(path), load_method="python")
        model = exl3.Model.from_config(config)
        storage = model.get_storage_info()  # from the headers, before loading
        model.load(device="cpu")
    torch.set_num_threads(threads)
    shared = {id(t) for t in st._codebook_markers.values()}
    mods: dict[str, int] = {}
    cpu: dict[str, bool] = {}
    n_lin = 0
    for m in model.modules:
        key = str(m.key)
        key = key[len(prefix):] if prefix and key.startswith(prefix) else key
        total = 0
        for sm in m:
            for name, t in sm.get_tensors().items():
                if id(t) in shared or (name.endswith((".mul1", ".mcg")) and t.numel() == 1):
                    continue
                total += t.numel() * t.element_size()
            if type(getattr(sm, "inner", None)).__name__ == "LinearEXL3":
                n_lin += 1
        mods[key] = total
        cpu[key] = bool(m.caps.get("prefer_cpu"))
    return Exl3Oracle(mods, cpu, n_lin, tuple(storage), model, config)


def oracle_cache_bytes(om: Exl3Oracle, *, tokens: int, k_bits: int | None = None, v_bits: int | None = None) -> int:
    """``sum(storage_size())`` of a real ``Cache`` of the loaded model's shape (fp16 when no bits)."""
    exl3 = import_exllamav3()
    from exllamav3.cache import CacheLayer_fp16, CacheLayer_quant

    with active():
        fresh = exl3.Model.from_config(om.config)
        if k_bits is None:
            cache = exl3.Cache(fresh, max_num_tokens=tokens, layer_type=CacheLayer_fp16)
        else:
            cache = exl3.Cache(fresh, max_num_tokens=tokens, layer_type=CacheLayer_quant, k_bits=k_bits, v_bits=v_bits)
        total = sum(int(layer.storage_size()) for layer in cache.layers.values())
    rec = getattr(cache, "recurrent_layers", None) or {}
    assert not rec, "recurrent state layers are not expected for the supported architectures"
    return total
