"""Helpers for the ExLlamaV2 0.3.2 oracle tests: header-only model dirs and the library's own numbers.

Nothing here runs on import: exllamav2 is imported lazily (with a stub ``exllamav2_ext`` module, see
``/work/shared/reference/environment.md`` section 2) because importing it pins torch to one thread.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.formats.exl2_synth import synthesize
from optimizer.safetensors_header import write_header_only

#: Real-size shapes (public configs). Dimensions only; no weights anywhere.
REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-3-8B": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    },
    "Llama-3-70B": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
        "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
    "Mixtral-8x7B": {
        "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
    },
    "Qwen2.5-32B": {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "intermediate_size": 27648,
        "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 64,
        "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    },
    "Gemma-2-27B": {
        "architectures": ["Gemma2ForCausalLM"], "hidden_size": 4608, "intermediate_size": 36864,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "num_hidden_layers": 46,
        "vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "sliding_window": 4096, "query_pre_attn_scalar": 144, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0, "tie_word_embeddings": True,
    },
    "Yi-34B": {
        "architectures": ["LlamaForCausalLM"], "hidden_size": 7168, "intermediate_size": 20480,
        "num_attention_heads": 56, "num_key_value_heads": 8, "num_hidden_layers": 60,
        "vocab_size": 64000, "max_position_embeddings": 200000, "rope_theta": 5000000.0,
        "rms_norm_eps": 1e-5,
    },
}


def tiny_config(arch: str = "LlamaForCausalLM", **over: Any) -> dict[str, Any]:
    """A tiny config of ``arch`` (2 layers, hidden 256) with ``over`` applied."""
    cfg: dict[str, Any] = {
        "architectures": [arch], "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 1000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    }
    if arch == "MixtralForCausalLM":
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    if arch == "Qwen3MoeForCausalLM":
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128, head_dim=64)
    if arch == "CohereForCausalLM":
        cfg.update(layer_norm_eps=1e-5, logit_scale=0.0625, tie_word_embeddings=True)
    if arch == "Gemma2ForCausalLM":
        cfg.update(head_dim=64, query_pre_attn_scalar=64, sliding_window=512, tie_word_embeddings=True)
    if arch == "Phi3ForCausalLM":
        cfg.update(max_position_embeddings=4096, original_max_position_embeddings=4096)
    cfg.update(over)
    return cfg


def tiny_gemma3_config(**over: Any) -> dict[str, Any]:
    """A tiny multimodal Gemma 3 config: language dims nested under ``text_config``."""
    text = {
        "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "num_hidden_layers": 2, "vocab_size": 1024, "max_position_embeddings": 4096,
        "query_pre_attn_scalar": 64, "sliding_window": 512, "rope_theta": 1000000.0,
    }
    text.update(over)
    return {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"hidden_size": 64, "image_size": 64, "patch_size": 16, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 128},
    }


def write_model_dir(path: Path, config: dict[str, Any], *, bits: float = 4.0, head_bits: int = 6) -> Path:
    """Write ``config.json`` (with an exl2 quantization_config) and a header-only exl2 safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(config)
    cfg.setdefault("quantization_config", {"quant_method": "exl2", "bits": bits, "head_bits": head_bits})
    (path / "config.json").write_text(json.dumps(cfg))
    write_header_only(path / "output.safetensors", synthesize(cfg, bits=bits, head_bits=head_bits))
    return path


def import_exllamav2() -> Any:
    """Import exllamav2 with a stub extension; skip the calling test when it is not installed."""
    import pytest

    pytest.importorskip("torch")
    if "exllamav2_ext" not in sys.modules:
        sys.modules["exllamav2_ext"] = types.ModuleType("exllamav2_ext")
    import torch

    threads = torch.get_num_threads()
    try:
        exl2 = pytest.importorskip("exllamav2")
    finally:
        torch.set_num_threads(threads)
    return exl2


@dataclass(frozen=True)
class OracleModel:
    """The library's own numbers for a model dir (bytes)."""

    config: Any
    model: Any
    footprints: dict[str, int]   # module key -> weight_footprint(), GPU modules only
    scratch: dict[str, int]      # module key -> scratch_space_fixed()


_ORACLE_MEMO: dict[tuple[Any, ...], OracleModel] = {}


def oracle_model(path: Path, *, max_seq_len: int | None = None, max_input_len: int | None = None,
                 max_batch_size: int | None = None) -> OracleModel:
    """``ExLlamaV2Config(path).prepare()`` + ``ExLlamaV2(config)`` (no load) and per-module numbers.

    Memoized per (path, settings): the files under ``path`` must not change between calls.
    """
    memo_key = (str(path), max_seq_len, max_input_len, max_batch_size)
    if memo_key not in _ORACLE_MEMO:
        _ORACLE_MEMO[memo_key] = _oracle_model(path, max_seq_len=max_seq_len, max_input_len=max_input_len,
                                               max_batch_size=max_batch_size)
    return _ORACLE_MEMO[memo_key]


def _oracle_model(path: Path, *, max_seq_len: int | None, max_input_len: int | None,
                  max_batch_size: int | None) -> OracleModel:
    exl2 = import_exllamav2()
    config = exl2.ExLlamaV2Config(str(path))
    config.prepare()
    if max_seq_len is not None:
        config.max_seq_len = max_seq_len
    if max_input_len is not None:
        config.max_input_len = max_input_len
    if max_batch_size is not None:
        config.max_batch_size = max_batch_size
    model = exl2.ExLlamaV2(config)
    fps: dict[str, int] = {}
    scr: dict[str, int] = {}
    for i, m in enumerate(model.modules):
        if i == 0:  # the embedding, which ExLlamaV2 always keeps in system RAM
            continue
        key = module_key(m, prefix=config.arch.lm_prefix)
        assert key not in fps, key
        fps[key] = m.weight_footprint()
        scr[key] = m.scratch_space_fixed()
    return OracleModel(config, model, fps, scr)


def module_key(m: Any, *, prefix: str = "") -> str:
    """exl2opt's key for an ExLlamaV2 module.

    ExLlamaV2 gives attention and MLP the same ``key`` (the layer); exl2opt appends ``.self_attn`` /
    ``.mlp`` and drops the language-model prefix (Gemma 3: ``language_model.``).
    """
    key = str(m.key)
    if prefix and key.startswith(prefix):
        key = key[len(prefix):]
    cls = type(m).__name__
    if cls in ("ExLlamaV2Attention", "ExLlamaV2ParallelDecoder"):
        return f"{key}.self_attn"
    if cls in ("ExLlamaV2MLP", "ExLlamaV2MoEMLP"):
        return f"{key}.mlp"
    return key


class FakeDevice:
    """Stands in for a CUDA device: ``footprint()`` indexes its result by ``tensor.device.index``."""

    def __init__(self, index: int) -> None:
        self.index = index


class FakeOnDevice:
    """A tensor seen as living on CUDA device ``index`` (for calling the real ``footprint()`` on CPU)."""

    def __init__(self, t: Any, index: int) -> None:
        self._t, self.device = t, FakeDevice(index)

    def numel(self) -> int:
        return int(self._t.numel())


def oracle_cache_bytes(om: OracleModel, mode: str, *, seq_len: int, batch_size: int = 1,
                       device: str = "meta") -> int:
    """``footprint()`` of the real cache class for ``mode`` on one device, bytes.

    The cache is constructed for real (``fixed_device=device``: ``"meta"`` allocates nothing,
    ``"cpu"`` allocates) and its tensors are then presented as living on CUDA device 0, which is
    all ``footprint()`` needs.
    """
    exl2 = import_exllamav2()
    cls = {
        "fp16": exl2.ExLlamaV2Cache, "fp8": exl2.ExLlamaV2Cache_8bit, "q8": exl2.ExLlamaV2Cache_Q8,
        "q6": exl2.ExLlamaV2Cache_Q6, "q4": exl2.ExLlamaV2Cache_Q4,
    }[mode]
    cache = cls(om.model, batch_size=batch_size, max_seq_len=seq_len, fixed_device=device)
    for name in ("key_states", "value_states", "key_scales", "value_scales"):
        lst = getattr(cache, name, None)
        if lst:
            setattr(cache, name, [FakeOnDevice(t, 0) for t in lst])
    temps = getattr(cache, "temp_tensors", None)
    if temps:
        cache.temp_tensors = {k: (FakeOnDevice(a, 0), FakeOnDevice(b, 0)) for k, (a, b) in temps.items()}
    fp = cache.footprint()
    assert len(fp) == 1
    return int(fp[0])
