"""ExLlamaV2 0.3.2's own manual-split placement (``ExLlamaV2.set_device_map``), run on CPU.

``set_device_map`` is pure arithmetic over the modules' ``weight_footprint()``, ``scratch_space()``
and ``temp_attn_size()`` until it builds one ``ExLlamaV2DeviceContext`` per device, which needs
CUDA; here that class is replaced by a do-nothing stand-in for the duration of the call. The model
is configured the way our backend configures it (``optimizer/backends/exllamav2.py``):
``max_seq_len``, ``max_input_len = min(chunk, max_seq_len)``, ``max_attention_size`` = its square,
``max_batch_size`` and ``no_flash_attn``. "Flash-attn available" is simulated by setting the
library's module-level ``has_flash_attn`` flag, which is all ``temp_attn_size()`` reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oracle_util import REAL_CONFIGS, import_exllamav2, module_key, write_model_dir

_MODELS: dict[str, Any] = {}


class _NoDeviceContext:
    """Stands in for ``ExLlamaV2DeviceContext`` (which allocates scratch on a CUDA device)."""

    def __init__(self, model: Any, device_idx: int, scratch_bytes: int) -> None:
        self.device_idx, self.scratch_bytes = device_idx, scratch_bytes


def _model(path: Path) -> Any:
    """``ExLlamaV2(config)`` for ``path``, built once (the settings live on ``model.config``)."""
    key = str(path)
    if key not in _MODELS:
        exl2 = import_exllamav2()
        config = exl2.ExLlamaV2Config(key)
        config.prepare()
        _MODELS[key] = exl2.ExLlamaV2(config)
    return _MODELS[key]


def library_device_map(path: Path, *, gpu_split: tuple[float, ...], max_seq_len: int, chunk: int = 2048,
                       batch_size: int = 1, flash_attn: bool = False) -> dict[str, int] | None:
    """Module key -> device index as ``set_device_map`` places it; None when the library refuses
    ("Insufficient space in device allocation"). The embedding (always on the CPU) is left out."""
    exl2 = import_exllamav2()
    import exllamav2.attn as attn_mod
    import exllamav2.model as model_mod

    model = _model(path)
    cfg = model.config
    cfg.max_seq_len = max_seq_len
    cfg.max_input_len = min(chunk, max_seq_len)
    cfg.max_attention_size = cfg.max_input_len**2
    cfg.max_batch_size = batch_size
    cfg.no_flash_attn = not flash_attn
    saved = attn_mod.has_flash_attn, model_mod.ExLlamaV2DeviceContext
    attn_mod.has_flash_attn = flash_attn
    model_mod.ExLlamaV2DeviceContext = _NoDeviceContext
    try:
        model.set_device_map(list(gpu_split))
    except AssertionError as e:
        if "Insufficient space in device allocation" in str(e):
            return None
        raise
    finally:
        attn_mod.has_flash_attn, model_mod.ExLlamaV2DeviceContext = saved
    del exl2
    prefix = cfg.arch.lm_prefix
    return {module_key(m, prefix=prefix): int(m.device_idx) for m in model.modules[1:]}


# --- cases: real-size shapes, random manual splits and settings ----------------------------------

#: Real-size shapes for the placement comparison (dimensions only; header-only files).
PLACEMENT_MODELS: dict[str, dict[str, Any]] = {
    "Llama-3.1-70B": dict(REAL_CONFIGS["Llama-3-70B"], max_position_embeddings=131072),
    "Llama-3-8B": REAL_CONFIGS["Llama-3-8B"],
    "Qwen2.5-32B": REAL_CONFIGS["Qwen2.5-32B"],
    "Gemma-2-27B": REAL_CONFIGS["Gemma-2-27B"],
    "Mixtral-8x7B": REAL_CONFIGS["Mixtral-8x7B"],
    # Smaug-72B-v0.1: Qwen1.5-72B dimensions, no grouped-query attention (64 KV heads)
    "Smaug-72B": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 24576,
        "num_attention_heads": 64, "num_key_value_heads": 64, "num_hidden_layers": 80, "vocab_size": 152064,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
    # Command-R 35B: parallel decoder (attention and MLP in one module), no GQA
    "Command-R-35B": {
        "architectures": ["CohereForCausalLM"], "hidden_size": 8192, "intermediate_size": 22528,
        "num_attention_heads": 64, "num_key_value_heads": 64, "num_hidden_layers": 40, "vocab_size": 256000,
        "max_position_embeddings": 131072, "layer_norm_eps": 1e-5, "logit_scale": 0.0625,
        "tie_word_embeddings": True,
    },
}
PLACEMENT_BITS = (3.0, 4.0, 6.0)
CACHES = ("fp16", "fp8", "q8", "q6", "q4")


@dataclass(frozen=True)
class PlacementCase:
    """One manual-split load: model dir, split (GiB per device) and settings."""

    model: str
    bits: float
    gpu_split: tuple[float, ...]
    max_seq_len: int
    cache: str
    batch_size: int
    chunk: int
    flash_attn: bool


def write_placement_models(root: Path) -> dict[tuple[str, float], Path]:
    """Header-only model dirs for every (model, bits) of the comparison."""
    return {(name, bits): write_model_dir(root / f"{name}-{bits}bpw", cfg, bits=bits)
            for name, cfg in PLACEMENT_MODELS.items() for bits in PLACEMENT_BITS}


def random_cases(rng: random.Random, dirs: dict[tuple[str, float], Path], n: int) -> list[PlacementCase]:
    """``n`` cases: 2-4 devices whose allocations are spread around the model's weights per device."""
    out = []
    for _ in range(n):
        name, bits = rng.choice(sorted(dirs))
        weights = sum(_ours_table(dirs[(name, bits)]).weights) / 2**30
        n_dev = rng.randint(2, 4)
        split = tuple(round(weights / n_dev * rng.uniform(0.5, 1.6) + rng.uniform(0.0, 8.0), rng.choice([0, 1, 2]))
                      for _ in range(n_dev))
        out.append(PlacementCase(
            model=name, bits=bits, gpu_split=split,
            max_seq_len=256 * rng.randint(1, 512) if rng.random() < 0.7 else rng.randint(1, 131072),
            cache=rng.choice(CACHES), batch_size=rng.choice([1, 1, 2, 4]), chunk=rng.choice([256, 512, 1024, 2048, 4096]),
            flash_attn=rng.random() < 0.5,
        ))
    return out


def _ours_table(path: Path) -> Any:
    from optimizer.formats.exl2_rules import _table

    return _table(_ours_variant(path))


_VARIANTS: dict[str, Any] = {}


def _ours_variant(path: Path) -> Any:
    from optimizer.sources.local import discover_local

    if str(path) not in _VARIANTS:
        (_VARIANTS[str(path)],) = discover_local(path)
    return _VARIANTS[str(path)]


def our_device_map(path: Path, case: PlacementCase) -> dict[str, int] | None:
    """Module key -> device index in exl2opt's manual-split placement; None when it does not place."""
    from optimizer.formats import RuntimeOptions
    from optimizer.formats.exl2_rules import variant_plan
    from optimizer.vram import Split, place

    plan = variant_plan(_ours_variant(path), max_seq_len=case.max_seq_len, cache=case.cache,
                        runtime=RuntimeOptions(batch_size=case.batch_size, chunk_len=case.chunk,
                                               flash_attn=case.flash_attn))
    v = place(plan=plan, split=Split(mode="manual", gpu_split=case.gpu_split), budgets=(2**50,), overhead_bytes=(0,))
    if not v.placed:
        return None
    out, start = {}, 0
    for d in v.devices:
        for name in plan.table.names[start:start + d.n_modules]:
            out[name] = d.index
        start += d.n_modules
    return out


def compare(path: Path, case: PlacementCase) -> tuple[dict[str, int] | None, dict[str, int] | None]:
    """(library's map, ours) for one case."""
    lib = library_device_map(path, gpu_split=case.gpu_split, max_seq_len=case.max_seq_len, chunk=case.chunk,
                             batch_size=case.batch_size, flash_attn=case.flash_attn)
    return lib, our_device_map(path, case)
