"""Oracle tests: exl2opt's exl2 VRAM model against ExLlamaV2 0.3.2's own numbers (CPU, stub extension).

For each model dir (header-only exl2 safetensors written by ``exl2_synth``) the library is asked for
``weight_footprint()`` and ``scratch_space_fixed()`` of every GPU module and for ``footprint()`` of each
real cache class; exl2opt's :func:`optimizer.formats.exl2.memory_plan` must give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from oracle_util import (
    REAL_CONFIGS,
    oracle_cache_bytes,
    oracle_model,
    tiny_config,
    tiny_gemma3_config,
    write_model_dir,
)

from optimizer.arch import parse_arch
from optimizer.formats.exl2 import Exl2Settings, cache_layer_bytes, cache_staging_bytes, memory_plan
from optimizer.safetensors_header import read_safetensors_header

pytestmark = pytest.mark.oracle

TINY_ARCHS = [
    "LlamaForCausalLM", "MistralForCausalLM", "YiForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM", "CohereForCausalLM",
]
TINY = {f"tiny-{a}": tiny_config(a) for a in TINY_ARCHS}
TINY["tiny-Gemma3-text_config"] = tiny_gemma3_config()
TINY["tiny-odd-head_dim-80"] = tiny_config(hidden_size=320, num_attention_heads=4, num_key_value_heads=1,
                                           head_dim=80)
CACHE_MODES = ("fp16", "fp8", "q8", "q6", "q4")
LENGTHS = (100, 257, 1000, 4096)


def _ours(path: Path, settings: Exl2Settings) -> tuple[Any, dict[str, int], dict[str, int]]:
    arch = parse_arch(json.loads((path / "config.json").read_text()))
    plan = memory_plan(arch=arch, tensors=read_safetensors_header(path / "output.safetensors"), settings=settings)
    return arch, {m.name: m.weight_bytes for m in plan.modules}, {m.name: m.scratch_bytes for m in plan.modules}


def _check_modules(path: Path, *, max_input_len: int = 2048, batch: int = 1) -> None:
    om = oracle_model(path, max_input_len=max_input_len, max_batch_size=batch)
    settings = Exl2Settings(max_seq_len=om.config.max_seq_len, max_input_len=max_input_len, batch_size=batch)
    _, weights, scratch = _ours(path, settings)
    assert weights == om.footprints
    assert scratch == om.scratch
    assert sum(weights.values()) == sum(om.footprints.values())
    assert max(scratch.values()) == max(om.scratch.values())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("oracle")
    out = {name: write_model_dir(root / name, cfg) for name, cfg in TINY.items()}
    out.update({name: write_model_dir(root / name, cfg, bits=3.0) for name, cfg in REAL_CONFIGS.items()})
    return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_weights_and_scratch_match_library(model_dirs: dict[str, Path], name: str) -> None:
    _check_modules(model_dirs[name])


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_size_weights_and_scratch_match_library(model_dirs: dict[str, Path], name: str) -> None:
    _check_modules(model_dirs[name])


@pytest.mark.parametrize("name", ["tiny-LlamaForCausalLM", "tiny-MixtralForCausalLM", "Llama-3-70B"])
def test_scratch_follows_chunk_and_batch(model_dirs: dict[str, Path], name: str) -> None:
    _check_modules(model_dirs[name], max_input_len=512, batch=3)


def _check_cache(path: Path, mode: str, length: int, *, batch: int = 1, device: str = "meta") -> None:
    om = oracle_model(path)
    s = Exl2Settings(max_seq_len=length, cache=mode, batch_size=batch)
    arch, _, _ = _ours(path, s)
    ours = arch.num_hidden_layers * cache_layer_bytes(arch, s) + cache_staging_bytes(arch, s)
    assert ours == oracle_cache_bytes(om, mode, seq_len=length, batch_size=batch, device=device)


@pytest.mark.parametrize("mode", CACHE_MODES)
@pytest.mark.parametrize("name", ["tiny-LlamaForCausalLM", "tiny-odd-head_dim-80", "tiny-Gemma3-text_config"])
def test_tiny_cache_allocated_on_cpu_matches_footprint(model_dirs: dict[str, Path], name: str, mode: str) -> None:
    for length in LENGTHS:
        _check_cache(model_dirs[name], mode, length, device="cpu")
    _check_cache(model_dirs[name], mode, 257, batch=2, device="cpu")


@pytest.mark.parametrize("mode", CACHE_MODES)
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_size_cache_matches_footprint(model_dirs: dict[str, Path], name: str, mode: str) -> None:
    # "meta" tensors: the real classes build every tensor, with shapes but no memory.
    for length in (*LENGTHS, 32768, 200_001):
        _check_cache(model_dirs[name], mode, length)


# --- config.json parsing against ExLlamaV2Config.prepare() --------------------------------------

ARCH_CASES: dict[str, dict[str, Any]] = {
    **{f"real-{k}": v for k, v in REAL_CONFIGS.items()},
    "llama2-no-kv-heads": tiny_config(num_key_value_heads=None, max_position_embeddings=4096),
    "explicit-head_dim": tiny_config(head_dim=96),
    "ctx-key-order": tiny_config(max_sequence_length=3000, model_max_length=5000, max_position_embeddings=7000),
    "ctx-model_max_length": tiny_config(model_max_length=5000, max_position_embeddings=7000),
    "ctx-default": {k: v for k, v in tiny_config().items() if k != "max_position_embeddings"},
    "qwen3": tiny_config("Qwen3ForCausalLM", head_dim=128),
    "qwen3-moe": tiny_config("Qwen3MoeForCausalLM"),
    "gemma2": tiny_config("Gemma2ForCausalLM"),
    "gemma3-text_config": tiny_gemma3_config(),
    "gemma3-text_config-defaults": tiny_gemma3_config(head_dim=None, num_attention_heads=None,
                                                      num_key_value_heads=None),
    "phi3": tiny_config("Phi3ForCausalLM"),
    "command-r": tiny_config("CohereForCausalLM"),
    "mixtral": tiny_config("MixtralForCausalLM"),
    "yi": tiny_config("YiForCausalLM", max_position_embeddings=200000),
}


@pytest.mark.parametrize("name", sorted(ARCH_CASES))
def test_parse_arch_matches_exllamav2_config(tmp_path: Path, name: str) -> None:
    cfg = {k: v for k, v in ARCH_CASES[name].items() if v is not None}
    if "text_config" in cfg:
        cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if v is not None}
    path = write_model_dir(tmp_path / "m", cfg)
    ex = oracle_model(path).config
    ours = parse_arch(json.loads((path / "config.json").read_text()))
    assert ours.hidden_size == ex.hidden_size
    assert ours.intermediate_size == ex.intermediate_size
    assert ours.num_attention_heads == ex.num_attention_heads
    assert ours.num_key_value_heads == ex.num_key_value_heads
    assert ours.head_dim == ex.head_dim
    assert ours.num_hidden_layers == ex.num_hidden_layers
    assert ours.vocab_size == ex.vocab_size
    assert ours.max_seq_len == ex.max_seq_len
    if ex.num_experts and ex.num_experts > 1:
        assert ours.num_experts == ex.num_experts
        assert ours.num_experts_per_tok == ex.num_experts_per_token
    assert ours.bits == 4.0 and ours.head_bits == 6


def test_smaug_example_matches_library() -> None:
    path = Path(__file__).resolve().parents[1] / "studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2"
    _check_modules(path)
    om = oracle_model(path)
    assert om.config.max_seq_len == 200000
