"""Builders of header-only exl2 variant directories for tests (synthesized, no weight data)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from optimizer.formats.exl2_synth import synthesize
from optimizer.safetensors_header import DTYPE_BYTES, write_header_only
from optimizer.variant import TensorInfo

TINY_LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4,
    "vocab_size": 1024, "max_position_embeddings": 8192,
}


def make_exl2_dir(root: Path, name: str, config: dict[str, Any], *, bits: float, head_bits: int = 6) -> Path:
    """Write ``root/name`` with config.json (incl. quantization_config) and a header-only output.safetensors."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.3.2", "bits": bits, "head_bits": head_bits}
    (d / "config.json").write_text(json.dumps(cfg))
    write_header_only(d / "output.safetensors", synthesize(cfg, bits=bits, head_bits=head_bits))
    return d


def synth_tensors(config: dict[str, Any], *, bits: float, head_bits: int = 6) -> list[TensorInfo]:
    """The synthesized exl2 tensor table of ``config`` as :class:`TensorInfo` (no files written)."""
    return [TensorInfo(name=name, dtype=dtype, shape=shape, nbytes=math.prod(shape) * DTYPE_BYTES[dtype])
            for name, (dtype, shape) in synthesize(config, bits=bits, head_bits=head_bits).items()]
