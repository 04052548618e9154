"""The real exllamav2 0.3.2 code, end to end on the CPU, through ``exl2opt search`` and ExLlamaV2Engine.

The compiled extension is replaced by the plain-torch TEST DOUBLE ``exl2_ext_standin`` (installed in
a subprocess by ``run_with_exl2_standin.py``); everything else is the real library and the real
CLI. The model is a tiny random-weight FP16 Llama (``tiny_llama``, attention made sharp enough that
cache precision shows: ``qk_std``/``vo_std``) and every perplexity is checked against an independent
fp32 forward of the same weights on the same windows. The evaluation text goes through the cache in
32-token chunks after a 64-token prefill, so scored tokens read quantized history and the cache mode shows up in perplexity.

Measured on the 2-core CPU box (2026-11-29): reference 476.77; FP16 +0.03 %, 8-bit +1.0 %, Q8 -0.16 %,
Q6 +0.49 %, Q4 +1.9 %. A random-weight model's perplexity can move either way under cache noise,
so Q8 is checked by its distance from the reference ("closer than Q4").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
if importlib.util.find_spec("exllamav2") is None:  # never imported here: it would JIT-build its extension
    pytest.skip("exllamav2 is not installed", allow_module_level=True)

from tiny_llama import corpus, reference_perplexity, write_tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "run_with_exl2_standin.py"
WINDOW, N_WINDOWS, PREFILL = 128, 4, 64  # EvalProtocol from --eval-window 128: prefill 64, score_chunk 32
CTX = 256


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), EXL2OPT_STANDIN_DEVICES="2")
    return subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=str(HERE.parent))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("exl2cpu")
    model = write_tiny_llama(root / "tinyllama", seed=0, qk_std=0.2, vo_std=0.2)
    text = root / "eval.txt"
    text.write_text(corpus(n_words=600, seed=42))
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_file(str(model / "tokenizer.json")).encode(text.read_text()).ids
    assert len(tokens) >= WINDOW * N_WINDOWS
    ref = reference_perplexity(model, tokens, window=WINDOW, n_windows=N_WINDOWS, prefill=PREFILL, bos=0)
    return {"model": model, "text": text, "ref": ref, "studies": root / "studies"}


def _search(tiny: dict[str, Any], study: str, *extra: str) -> subprocess.CompletedProcess[str]:
    r = _run("cli", "search", "--model", str(tiny["model"]), "--vram", "4GiB", "--margin", "0", "--ctx", str(CTX), "--min-ctx", str(CTX),
             "--eval-data", str(tiny["text"]), "--eval-window", str(WINDOW), "--eval-windows", str(N_WINDOWS),
             "--speed-fill", "64", "--studies-dir", str(tiny["studies"]), "--study", study, "--no-report", "--exhaustive", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _trials(tiny: dict[str, Any], study: str) -> dict[str, dict[str, Any]]:
    import optuna

    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tiny["studies"] / study / "journal.log")))
    st = optuna.load_study(study_name=study, storage=storage)
    return {t.params["cache"]: dict(t.user_attrs) for t in st.trials if t.user_attrs.get("status") == "measured"}


def test_single_gpu_all_cache_modes_with_resume_match_the_reference(tiny: dict[str, Any]) -> None:
    first = _search(tiny, "single", "--n-trials", "2")
    assert "measured 2" in first.stdout
    second = _search(tiny, "single")  # the same study: resumes and measures the other three
    assert "measured 3" in second.stdout, second.stdout
    got = _trials(tiny, "single")
    assert sorted(got) == ["fp16", "fp8", "q4", "q6", "q8"]
    ref = tiny["ref"]
    ppl = {c: float(a["perplexity"]) for c, a in got.items()}
    dist = {c: abs(p - ref) / ref for c, p in ppl.items()}
    print(f"reference {ref:.6f}; " + ", ".join(f"{c} {ppl[c]:.6f} ({(ppl[c] - ref) / ref * 100:+.4f} %)" for c in ppl))
    assert dist["fp16"] < 1e-3  # FP16 cache within 0.1 % of the fp32 reference
    assert ppl["q4"] > ppl["fp16"] and dist["q4"] > dist["fp16"]  # a 4-bit cache is worse than FP16
    assert dist["q8"] < dist["q4"]  # and an 8-bit Q cache stays closer than Q4
    for a in got.values():
        assert a["gen_tok_s"] > 0 and a["prompt_tok_s"] > 0 and a["context_fill"] == 64
        assert a["measured"] and all("overhead" in m for m in a["measured"])


@pytest.mark.parametrize("split", [("--gpu-split", "0.003,1"), ("--gpus", "2")], ids=["manual", "autosplit"])
def test_multi_gpu_splits_measure_the_same_perplexity(tiny: dict[str, Any], split: tuple[str, str]) -> None:
    study = f"split-{split[0].strip('-')}"
    r = _search(tiny, study, "--cache", "fp16,q4", *split)
    assert "measured 2" in r.stdout, r.stdout
    got = _trials(tiny, study)
    assert abs(float(got["fp16"]["perplexity"]) - tiny["ref"]) / tiny["ref"] < 1e-3
    assert float(got["q4"]["perplexity"]) != float(got["fp16"]["perplexity"])


def test_library_default_attention_is_not_causal_and_ours_is(tiny: dict[str, Any]) -> None:
    r = _run("causality", str(tiny["model"]))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(res["ours"]["line"], "|", res["default"]["line"])
    assert res["ours"]["no_sdpa"] and res["ours"]["passed"]
    assert not res["default"]["passed"] and res["default"]["before"] > 0.1
    assert set(res["ext_calls"]) <= {"stloader_read", "rms_norm", "rope_"}


def test_a_cache_built_in_a_shared_autosplit_placement_measures_what_a_fresh_load_does(tiny: dict[str, Any]) -> None:
    """LoadSpec.place_around with the real exllamav2: load_autosplit around a lazy FP16 cache, then a Q4 and a Q8
    cache created afterwards land on model.cache_map's devices and measure the same perplexity as a fresh load."""
    r = _run("placement", str(tiny["model"]), str(tiny["text"]))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    q4, q8, fresh = res["shared_q4"], res["shared_q8"], res["fresh_q4"]
    assert q4["loaded"] and q4["placed_around"] == [256, "fp16"] and q4["rope_len"] == 256
    assert not q8["loaded"] and q8["placed_around"] == [256, "fp16"]  # same placement: only the cache rebuilt
    assert fresh["loaded"] and fresh["placed_around"] is None and fresh["rope_len"] == 128
    for got in (q4, q8):
        assert got["key_devices"] == got["cache_map"] and got["staging"] == got["cache_map"]
    assert q4["ppl"] == pytest.approx(fresh["ppl"], rel=1e-6)
    assert q8["ppl"] != q4["ppl"]
