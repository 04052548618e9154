"""The user's case (Smaug-34B exl2 3.0bpw-h6 under 15 GB) and exl2 model rules, without exllamav2."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from optimizer.arch import parse_arch
from optimizer.cli import app
from optimizer.formats import RuntimeOptions
from optimizer.formats.exl2 import Exl2Settings, cache_layer_bytes, cache_staging_bytes
from optimizer.sources.local import variant_from_dir
from optimizer.space import Budget, Configuration, evaluate, max_context
from optimizer.units import GIB, parse_size
from optimizer.vram import Split

SMAUG = Path(__file__).resolve().parents[1] / "studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2"
BUDGET = Budget(per_device=(parse_size("15GiB"),))  # a T4: 15360 MiB
#: the same T4 with a 400 MiB per-GPU overhead (a lazily loaded CUDA context, docs/calibration.md), as a
#: calibrated GPU could report (a given overhead keeps no default margin)
BUDGET_CALIBRATED = Budget(per_device=(parse_size("15GiB"),), overhead=(400 * 2**20,))


def test_smaug_fp16_cache_at_default_context_does_not_fit() -> None:
    v = variant_from_dir(SMAUG)
    verdict = evaluate(config=Configuration(variant=v, max_seq_len=200000, cache="fp16", split=Split()), budget=BUDGET)
    assert not verdict.fits
    cache_gib = verdict.devices[0].cache / GIB
    assert 45.7 <= cache_gib <= 45.9
    # Independent arithmetic: 60 layers x K,V x 200000 tokens x 8 heads x 128 x 2 bytes.
    assert verdict.devices[0].cache == 60 * 2 * 200000 * 8 * 128 * 2


def test_smaug_q4_gives_about_3x_the_fp16_context() -> None:
    v = variant_from_dir(SMAUG)
    flash = RuntimeOptions(flash_attn=True)  # only the cache sizes differ (no context-dependent attention terms)
    fp16 = max_context(variant=v, cache="fp16", split=Split(), budget=BUDGET_CALIBRATED, runtime=flash)
    q4 = max_context(variant=v, cache="q4", split=Split(), budget=BUDGET_CALIBRATED, runtime=flash)
    assert fp16.max_seq_len and q4.max_seq_len
    assert fp16.max_seq_len < 200000 and q4.verdict is not None and q4.verdict.fits
    assert 3.0 <= q4.max_seq_len / fp16.max_seq_len <= 3.7


def test_smaug_without_flash_attn_pays_for_matmul_attention_scores() -> None:
    # Without flash-attn the backend runs exllamav2's causal matmul attention: fp16 scores of
    # 56 heads x chunk^2, twice, i.e. ~0.9 GiB at chunk 2048 and 1/16 of that at chunk 512.
    v = variant_from_dir(SMAUG)
    ctx = {ch: max_context(variant=v, cache="q4", split=Split(), budget=BUDGET_CALIBRATED,
                           runtime=RuntimeOptions(chunk_len=ch)).max_seq_len or 0 for ch in (512, 2048)}
    with_flash = max_context(variant=v, cache="q4", split=Split(), budget=BUDGET_CALIBRATED,
                             runtime=RuntimeOptions(flash_attn=True)).max_seq_len or 0
    assert 0 < ctx[2048] < ctx[512]
    assert ctx[2048] < with_flash


def test_smaug_with_the_uncalibrated_default_overhead_keeps_only_a_short_context() -> None:
    # weights 12.02 GiB + the head's 0.85 GiB dequant scratch + 1 GiB overhead leave ~0.1 GiB of 13.97 GiB
    v = variant_from_dir(SMAUG)
    default = max_context(variant=v, cache="q4", split=Split(), budget=BUDGET).max_seq_len or 0
    calibrated = max_context(variant=v, cache="q4", split=Split(), budget=BUDGET_CALIBRATED).max_seq_len or 0
    assert 0 < default < calibrated


@pytest.mark.parametrize("command", ["fit", "plan"])
def test_cli_on_smaug_exits_zero(command: str) -> None:
    result = CliRunner().invoke(app, [command, "-m", str(SMAUG), "--vram", "15GB"])
    assert result.exit_code == 0, result.output
    assert "Smaug" in result.output or "3.0" in result.output


def test_q_cache_allocation_ignores_q_block_rounding() -> None:
    # Hkv*D = 80 is not a multiple of 512 (q_block 32), but ExLlamaV2 allocates before rounding.
    arch = parse_arch({"architectures": ["LlamaForCausalLM"], "hidden_size": 320, "num_attention_heads": 4,
                       "num_key_value_heads": 1, "head_dim": 80, "num_hidden_layers": 2,
                       "intermediate_size": 512, "vocab_size": 1000})
    s = Exl2Settings(max_seq_len=257, cache="q4")
    # K, V: 257 x 80 / 2 bytes; scales: 257 x (80 // 32) x 2 bytes each.
    assert cache_layer_bytes(arch, s) == 2 * 257 * 40 + 2 * 257 * 2 * 2
    assert cache_staging_bytes(arch, s) == 2 * 257 * 80 * 2
