"""`fit` / `plan` --gpu: predicted columns and the one decision line, offline on the shipped example and fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir

from optimizer.cli import main
from optimizer.cli._predict import Candidate, choose
from optimizer.predict import Estimate
from optimizer.predict.configs import ConfigPrediction, variant_bits
from optimizer.sources.local import discover_local
from optimizer.variant import Location

EXAMPLE = Path(__file__).resolve().parents[1] / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


@pytest.fixture()
def two_variants(tmp_path: Path) -> Path:
    make_exl2_dir(tmp_path / "m", "3.0bpw", TINY_LLAMA, bits=3.0)
    make_exl2_dir(tmp_path / "m", "6.0bpw", TINY_LLAMA, bits=6.0)
    return tmp_path / "m"


def test_fit_on_the_example_shows_predictions_and_one_pick(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--gpu", "T4"], capsys)
    assert code == 0, err
    assert "pred." in out and "(+16" in out  # the ppl column's interval cell (+16..+73 %)
    picks = [ln for ln in out.splitlines() if ln.startswith("Pick:")]
    assert len(picks) == 1
    # a T4 (15 GiB): the FP16 cache reaches only 1536 tokens, so the pick is a quantized cache with >= 4096 tokens
    assert "context 1536" not in picks[0] and "tok/s on Tesla T4" in picks[0]


def test_fit_json_carries_predicted_columns_and_exact_bits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--gpu", "rtx 4090", "--json"], capsys)
    assert code == 0
    rows = json.loads(out)
    assert {r["cache"] for r in rows} == {"fp16", "fp8", "q8", "q6", "q4"}
    for r in rows:
        assert r["pred_bits"] == pytest.approx(3.0, abs=0.02)  # from the headers, not the label
        assert r["pred_ppl_change_low_pct"] <= r["pred_ppl_change_pct"] <= r["pred_ppl_change_high_pct"]
        assert r["pred_gen_tok_s_low"] <= r["pred_gen_tok_s"] <= r["pred_gen_tok_s_high"]
    by = {r["cache"]: r for r in rows}
    assert by["fp16"]["pred_ppl_change_pct"] < by["q4"]["pred_ppl_change_pct"] < by["fp8"]["pred_ppl_change_pct"]


def test_plan_prefers_the_better_variant_and_shows_speed_only_with_a_gpu(two_variants: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plan", "-m", str(two_variants), "--vram", "4GB", "--ctx", "4096", "--cache", "fp16", "--json"], capsys)
    rows = json.loads(out)
    assert code == 0 and all("pred_gen_tok_s" not in r for r in rows)
    code, out, _ = run(["plan", "-m", str(two_variants), "--vram", "4GB", "--ctx", "4096", "--cache", "fp16", "--gpu", "3090"], capsys)
    pick = next(ln for ln in out.splitlines() if ln.startswith("Pick:"))
    assert "6.0bpw" in pick and "RTX 3090" in pick
    code, out, _ = run(["plan", "-m", str(two_variants), "--vram", "4GB", "--ctx", "4096", "--cache", "fp16", "--gpu", "3090",
                        "--json"], capsys)
    speed = {r["bits"]: r["pred_gen_tok_s"] for r in json.loads(out)}
    assert speed[3.0] > speed[6.0]


def test_gpu_list_needs_no_model(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["fit", "--gpu", "list"], capsys)
    assert code == 0 and "RTX 4090" in out and "H100 SXM5 80GB" in out
    t4 = next(ln for ln in out.splitlines() if ln.startswith("Tesla T4"))
    assert "16 GB nominal" in t4 and "--vram 15GiB" in out  # the board size is not the budget to give


@pytest.mark.parametrize("name", ["voodoo", "a100"])
def test_unknown_gpu_is_one_line_usage_error(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["fit", "-m", str(EXAMPLE), "--vram", "15GB", "--gpu", name], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_gpu_auto_without_a_gpu_says_so_and_continues(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("optimizer.predict.gpus.detect_gpu_names", lambda **_: [])
    code, out, err = run(["fit", "-m", str(EXAMPLE), "--vram", "15GB", "--gpu", "auto"], capsys)
    assert code == 0 and "no GPU found" in err and "Pick:" in out


def test_gpu_auto_uses_the_detected_gpu(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("optimizer.predict.gpus.detect_gpu_names", lambda **_: ["NVIDIA GeForce RTX 4090"])
    code, out, _ = run(["fit", "-m", str(EXAMPLE), "--vram", "24GB", "--gpu", "auto"], capsys)
    assert code == 0 and "tok/s on RTX 4090" in out


def test_download_command_is_shell_quoted() -> None:
    loc = Location(kind="hub", repo_id="org/model", revision="3.0bpw; rm -rf ~")
    cmd = loc.download_command()
    assert "--revision '3.0bpw; rm -rf ~'" in cmd and "--local-dir 'model-3.0bpw; rm -rf ~'" in cmd


def _cand(v, cache: str, ctx: int, ratio: float, tps: float) -> Candidate:
    return Candidate(v, cache, ctx, ConfigPrediction(Estimate(ratio, ratio, ratio), False, Estimate(tps, tps, tps), 2048, 4.0))


def test_choose_prefers_a_usable_context_then_quality_then_speed() -> None:
    (v,) = discover_local(EXAMPLE)
    short_best = _cand(v, "fp16", 1792, 1.10, 20)
    long_a = _cand(v, "q4", 6144, 1.12, 19)
    long_b = _cand(v, "q6", 4352, 1.11, 18)
    pick, best = choose([short_best, long_a, long_b]) or (None, None)
    assert pick is long_b and best is short_best
    tie = _cand(v, "q8", 4352, 1.11, 25)
    assert choose([long_b, tie])[0] is tie  # type: ignore[index]
    only_short = _cand(v, "fp16", 1024, 1.2, 10)
    assert choose([only_short])[0] is only_short  # type: ignore[index]


def test_variant_bits_counts_exl2_linears_once() -> None:
    (v,) = discover_local(EXAMPLE)
    vb = variant_bits(v)
    assert vb is not None and vb.n_layers == 60
    assert vb.head_bits == pytest.approx(6.33, abs=0.05)
    assert 33e9 < vb.decoder_params < 34e9  # Yi-34B decoder


def test_search_predict_only_writes_the_predicted_front_without_a_backend(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import csv

    code, out, err = run(["search", "-m", str(EXAMPLE), "--vram", "24GB", "--predict-only", "--gpu", "RTX 4090",
                          "--backend", "exllamav2", "--studies-dir", str(tmp_path), "--study", "p"], capsys)
    assert code == 0, err
    d = tmp_path / "p"
    trials = list(csv.DictReader((d / "trials.csv").open()))
    front = list(csv.DictReader((d / "pareto.csv").open()))
    assert (d / "pareto_predicted.png").is_file() and not (d / "journal.log").exists()  # no study, no GPU
    assert {r["source"] for r in trials} == {"predicted"} and front
    fitting = [r for r in trials if r["fits"] == "True"]
    assert all(float(r["ppl_vs_fp16_low"]) <= float(r["ppl_vs_fp16"]) <= float(r["ppl_vs_fp16_high"]) for r in fitting)
    assert all(r["ppl_vs_fp16"] == "" and r["reason"] for r in trials if r["fits"] == "False")
    keys = {r["config_key"] for r in front}
    assert keys <= {r["config_key"] for r in fitting}
    # nothing in the file dominates a front row
    for f in front:
        for r in fitting:
            better = (float(r["ppl_vs_fp16"]) <= float(f["ppl_vs_fp16"]) and float(r["gen_tok_s"]) >= float(f["gen_tok_s"])
                      and int(r["max_seq_len"]) >= int(f["max_seq_len"]))
            strictly = (float(r["ppl_vs_fp16"]), float(r["gen_tok_s"]), int(r["max_seq_len"])) != (
                float(f["ppl_vs_fp16"]), float(f["gen_tok_s"]), int(f["max_seq_len"]))
            assert not (better and strictly)
    assert "predicted front" in out


def test_search_predict_only_without_matplotlib_says_how_to_get_the_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ModuleNotFoundError, as in the base install
    code, out, err = run(["search", "-m", str(EXAMPLE), "--vram", "24GB", "--predict-only", "--studies-dir", str(tmp_path),
                          "--study", "p"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["pareto.csv", "trials.csv"]
    assert "pareto_predicted.png not drawn: matplotlib is not installed (pip install 'exl2opt[plots]')" in out.splitlines()


def test_the_pick_says_so_when_the_variants_are_of_different_models(capsys: pytest.CaptureFixture[str]) -> None:
    both = EXAMPLE.parent  # studies/examples: the Smaug-34B exl2 and the Llama-3.1-8B EXL3 example
    _, out, _ = run(["fit", "-m", str(both), "--vram", "24GB", "--recipe", "script"], capsys)
    pick = [ln for ln in out.splitlines() if ln.startswith("Pick:")]
    assert len(pick) == 1 and "the variants are of different models" in pick[0]
    _, out, _ = run(["fit", "-m", str(EXAMPLE), "--vram", "24GB", "--recipe", "script"], capsys)
    assert "different models" not in out


def test_variants_of_one_model_give_no_different_models_note(two_variants: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(["fit", "-m", str(two_variants), "--vram", "24GB"], capsys)
    assert "Pick:" in out and "different models" not in out
