"""The shipped perplexity data and what the quality prior learns from it (optimizer/predict/data/published-ppl.csv)."""

from __future__ import annotations

import csv
import importlib.util
import math
from collections import defaultdict
from pathlib import Path

import pytest

from optimizer.predict import quality
from optimizer.predict.quality import CURVES, RD_SLOPE

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "optimizer" / "predict" / "data" / "published-ppl.csv"


def _rows() -> list[dict[str, str]]:
    with DATA.open() as f:
        return list(csv.DictReader(f))


def _bpw_script():  # scripts/ is not a package: load the converter by path
    spec = importlib.util.spec_from_file_location("gguf_decoder_bpw", ROOT / "scripts" / "gguf_decoder_bpw.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_row_is_sourced_and_a_measured_reference_is_one_per_unit() -> None:
    refs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in _rows():
        assert r["source_url"].startswith("https://github.com/") and r["note"] and r["eval"]
        assert r["format"] in CURVES and 1.0 < float(r["bpw"]) < 9.0 and float(r["ppl"]) > 1.0
        refs[(r["model"], r["eval"])].add(r["ref_ppl"])
        if r["ref_ppl"]:  # a quantized model is not better than its FP16 beyond noise
            assert float(r["ppl"]) >= 0.999 * float(r["ref_ppl"])
    assert all(len(v) == 1 for v in refs.values())
    assert sum(1 for v in refs.values() if v != {""}) >= 3


def test_file_size_conversion_reproduces_the_chart_positions_of_the_same_gguf_types() -> None:
    """Llama-3-70B files (dranger003's sizes) against the exllamav3 chart's x positions for Llama-3.1-70B-Instruct
    (same tensor shapes): the decoder-only bpw must agree within the chart's reading precision."""
    conv = _bpw_script()
    chart = {r["note"].split(";")[0]: float(r["bpw"]) for r in _rows()
             if r["model"] == "Llama-3.1-70B-Instruct" and r["format"] == "gguf"}
    sizes = {"IQ1_S": 14.29, "IQ2_XXS": 17.79, "IQ2_S": 20.71, "IQ3_XXS": 25.58, "IQ3_S": 28.79, "IQ3_M": 29.74,
             "IQ4_XS": 35.30, "Q4_K_M": 39.60, "Q5_K_M": 46.52}
    for mix, gib in sizes.items():
        assert conv.decoder_bpw("llama3-70b", gib, mix) == pytest.approx(chart[mix], abs=0.02), mix
    # the vocabulary tensors are what makes file bpw and decoder bpw differ: without them the 8B is far off
    assert conv.decoder_bpw("llama3-8b", 2.43, "iq2_xs") < 2.43 * 8 * 2**30 / 8.03e9 - 0.2


@pytest.mark.parametrize("fmt", sorted(CURVES))
def test_two_anchors_use_the_rate_distortion_slope(fmt: str) -> None:
    lo, hi = (3.0, 9.0), (6.0, 7.2)
    mid = quality(fmt, [4.5], anchors=[lo, hi])[0].value
    # ln p = r + A exp(-c b) through both anchors with c = ln 4
    x_lo, x_hi, x = (math.exp(-RD_SLOPE * b) for b in (3.0, 6.0, 4.5))
    a = (math.log(9.0) - math.log(7.2)) / (x_lo - x_hi)
    r = math.log(7.2) - a * x_hi
    assert mid == pytest.approx(math.exp(r + a * x), rel=1e-9)


def test_zero_anchor_interval_covers_most_measured_fp16_ratios() -> None:
    """The prior's interval is meant as about one standard deviation of a model's sensitivity: on the llama.cpp
    tables (measured FP16 reference, in sample) it must contain three quarters of the points from 2.4 bpw up."""
    inside = total = 0
    for r in _rows():
        if r["ref_ppl"] and float(r["bpw"]) >= 2.4:
            est = quality(r["format"], [float(r["bpw"])])[0]
            ratio = float(r["ppl"]) / float(r["ref_ppl"])
            inside += est.low <= ratio <= est.high
            total += 1
    assert total >= 40 and inside / total >= 0.75
