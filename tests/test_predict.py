"""optimizer.predict: the public quality / speed API, checked against its own model and the shipped published data."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from optimizer.errors import BadOptionError
from optimizer.predict import (
    Estimate,
    SpeedPoint,
    cache_penalty,
    decode_speed,
    find_gpu,
    fit,
    fit_decode,
    known_gpus,
    kv_read_bytes_per_token,
    prompt_speed,
    quality,
    split_decode_speed,
)

DATA = Path(__file__).resolve().parents[1] / "optimizer" / "predict" / "data"


def _curve(model: str, fmt: str) -> list[tuple[float, float]]:
    with (DATA / "published-ppl.csv").open() as f:
        return sorted((float(r["bpw"]), float(r["ppl"])) for r in csv.DictReader(f)
                      if r["model"] == model and r["format"] == fmt and r["head_bits"] != "3")


def test_import_pulls_in_neither_torch_nor_optuna() -> None:
    code = "import sys, optimizer.predict; print(sorted(m for m in ('torch', 'optuna', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_estimate_rejects_value_outside_interval() -> None:
    with pytest.raises(ValueError):
        Estimate(1.0, 1.1, 2.0)
    with pytest.raises(ValueError):
        Estimate(math.nan, 0.0, 1.0)


@pytest.mark.parametrize("fmt", ["exl2", "exl3", "gguf"])
def test_zero_anchor_ratio_falls_with_bits_and_brackets_the_value(fmt: str) -> None:
    est = quality(fmt, [2.5, 3.0, 4.0, 5.0, 6.0, 8.0])
    assert all(e.low <= e.value <= e.high for e in est)
    values = [e.value for e in est]
    assert values == sorted(values, reverse=True)
    assert values[-1] < 1.01 < values[0]  # ratios to FP16: near lossless at 8 bpw, clearly lossy at 2.5
    assert all(e.high > e.low for e in est)


def test_exl3_needs_about_one_bit_less_than_exl2_for_the_same_loss() -> None:
    exl2 = quality("exl2", [4.4])[0].value
    exl3 = quality("exl3", [3.4])[0].value
    assert abs(math.log(exl2) - math.log(exl3)) < 0.5 * math.log(exl2)


def test_two_anchors_pass_through_the_anchors_and_interpolate_published_curve() -> None:
    pts = _curve("Llama-3.1-8B-Instruct", "exl2")
    lo = min(pts, key=lambda p: abs(p[0] - 3.0))
    hi = max(pts)
    est = quality("exl2", [lo[0], hi[0]], anchors=[lo, hi])
    assert est[0].value == pytest.approx(lo[1], rel=1e-9)
    assert est[1].value == pytest.approx(hi[1], rel=1e-9)
    inner = [p for p in pts if lo[0] < p[0] < hi[0]]
    pred = quality("exl2", [b for b, _ in inner], anchors=[lo, hi])
    errors = sorted(abs(e.value / p - 1) for e, (_, p) in zip(pred, inner, strict=True))
    assert errors[len(errors) // 2] < 0.01  # median within 1 % between the anchors


def test_one_anchor_sets_the_level_and_keeps_the_prior_shape() -> None:
    ratio = quality("exl2", [3.0, 5.0])
    anchored = quality("exl2", [3.0, 5.0], anchors=[(3.0, 10.0)])
    assert anchored[0].value == pytest.approx(10.0)
    assert anchored[1].value == pytest.approx(10.0 * ratio[1].value / ratio[0].value)
    assert anchored[1].high - anchored[1].low > anchored[0].high - anchored[0].low  # far from the anchor: wider


def test_three_anchors_fit_the_slope() -> None:
    c_true, a_true, ref = 2.2, 400.0, 6.0
    pts = [(b, ref * math.exp(a_true * math.exp(-c_true * b))) for b in (2.5, 3.5, 5.0, 6.5)]
    f = fit("exl2", pts)
    assert f.c == pytest.approx(c_true, abs=0.03)
    assert quality("exl2", [4.2], anchors=pts)[0].value == pytest.approx(ref * math.exp(a_true * math.exp(-c_true * 4.2)), rel=2e-3)


def test_non_monotone_anchors_do_not_produce_a_rising_curve() -> None:
    est = quality("exl2", [4.0, 5.0, 6.0], anchors=[(4.0, 7.70), (6.0, 7.71)])  # noise: lower bits measured better
    assert est[0].value >= est[2].value - 1e-12


@pytest.mark.parametrize("bad", [dict(fmt="awq"), dict(bits=[math.nan]), dict(bits=[0.0]), dict(anchors=[(4.0, -1.0)]),
                                 dict(params_b=-3)])
def test_quality_rejects_bad_input(bad: dict) -> None:
    args = dict(fmt="exl2", bits=[4.0], anchors=(), params_b=None)
    args.update(bad)
    with pytest.raises(ValueError):
        quality(**args)  # type: ignore[arg-type]


def test_small_models_get_wider_prior_intervals() -> None:
    big = quality("exl2", [3.5], params_b=70)[0]
    small = quality("exl2", [3.5], params_b=1.2)[0]
    assert small.value == pytest.approx(big.value)
    assert small.high - small.low > big.high - big.low


def test_cache_penalties_order_by_precision() -> None:
    exl2 = [cache_penalty("exl2", c).value for c in ("fp16", "q8", "q6", "q4", "fp8")]
    assert exl2 == sorted(exl2) and exl2[0] == 0.0
    gguf = [cache_penalty("gguf", c).value for c in ("f16", "q8_0/f16", "q8_0", "q8_0/q4_0", "q4_0")]
    assert gguf == sorted(gguf)
    assert cache_penalty("exl3", "k3v4").value > cache_penalty("exl3", "k4v3").value  # keys are the sensitive half
    unknown = cache_penalty("exl2", "mystery")
    assert unknown.high >= 0.05  # an unknown mode is not assumed lossless


# --- GPUs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("4090", "RTX 4090"), ("rtx-4090", "RTX 4090"), ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("RTX 3090", "RTX 3090"), ("3090 Ti", "RTX 3090 Ti"), ("Tesla T4", "Tesla T4"), ("t4", "Tesla T4"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM4 80GB"), ("NVIDIA H100 80GB HBM3", "H100 SXM5 80GB"), ("a10", "A10"),
    ("NVIDIA L4", "L4"), ("l40s", "L40S"),
])
def test_gpu_names_match_forgivingly(name: str, expected: str) -> None:
    assert find_gpu(name).name == expected


@pytest.mark.parametrize("name", ["a100", "rtx", "voodoo 2", ""])
def test_unknown_or_ambiguous_gpu_is_a_usage_error(name: str) -> None:
    with pytest.raises(BadOptionError):
        find_gpu(name)


def test_gpu_table_has_sources_and_bandwidths() -> None:
    gpus = known_gpus()
    assert len(gpus) >= 25
    assert all(g.bandwidth_gb_s > 100 and g.source_url and g.host in ("desktop", "server") for g in gpus)
    assert len({g.name for g in gpus}) == len(gpus)


# --- speed ------------------------------------------------------------------------------------------------


def test_decode_speed_falls_with_weights_and_fill() -> None:
    w = 4_000_000_000
    kv = kv_read_bytes_per_token(fmt="exl2", cache="fp16", n_layers=32, kv_dim=1024)
    assert kv == 2 * 32 * 1024 * 2
    base = decode_speed("RTX 4090", w, kv, 0, 32)
    assert decode_speed("RTX 4090", 2 * w, kv, 0, 32).value < base.value
    assert decode_speed("RTX 4090", w, kv, 16384, 32).value < base.value
    assert base.low < base.value < base.high
    # roofline bound: never faster than reading the weights at the full bandwidth
    assert base.high < 1008e9 / w


def test_exl2_quantized_cache_reads_more_than_fp16_gguf_less() -> None:
    fp16 = kv_read_bytes_per_token(fmt="exl2", cache="fp16", n_layers=32, kv_dim=1024)
    assert kv_read_bytes_per_token(fmt="exl2", cache="q4", n_layers=32, kv_dim=1024) > fp16
    assert kv_read_bytes_per_token(fmt="gguf", cache="q4_0", n_layers=32, kv_dim=1024) < fp16


def test_server_hosts_pay_more_per_layer() -> None:
    # A100 80GB has twice the 4090's bandwidth, yet a small model is not faster there (host-bound, issue #346)
    small = 600_000_000
    assert decode_speed("A100 SXM4 80GB", small, 0, 0, 22).value < decode_speed("RTX 4090", small, 0, 0, 22).value


def test_split_adds_device_times_and_a_hop() -> None:
    one = split_decode_speed(["RTX 3090"], [20_000_000_000], [0], 0, 80)
    two = split_decode_speed(["RTX 3090"], [10_000_000_000, 10_000_000_000], [0, 0], 0, 80)
    assert two.value < one.value
    assert 1 / two.value - 1 / one.value == pytest.approx(0.33e-3, rel=1e-6)
    mixed = split_decode_speed(["RTX 4090", "RTX 3060 12GB"], [10_000_000_000, 10_000_000_000], [0, 0], 0, 80)
    assert mixed.value < two.value  # the slow card's share counts at its own bandwidth
    with pytest.raises(ValueError):
        split_decode_speed(["RTX 3090", "RTX 4090", "RTX 4090"], [1, 1], [0, 0], 0, 80)


def test_prompt_speed_falls_with_prompt_length_and_needs_a_known_rate() -> None:
    short = prompt_speed("RTX 4090", 7_000_000_000, 32, 4096, 512)
    long = prompt_speed("RTX 4090", 7_000_000_000, 32, 4096, 16384)
    assert short is not None and long is not None and long.value < short.value
    assert prompt_speed("RTX 4080", 7_000_000_000, 32, 4096, 512) is None  # no verified FP16 rate in the table


def test_fit_decode_recovers_efficiency_and_layer_cost() -> None:
    bw, eta, tau = 936e9, 0.81, 55e-6
    pts = [SpeedPoint(bw, w, 0, 40, 1 / (w / (eta * bw) + 40 * tau)) for w in (4e9, 6e9, 9e9)]
    cal = fit_decode(pts)
    assert cal.eta_w == pytest.approx(eta, rel=1e-6)
    assert cal.tau == pytest.approx(tau, rel=1e-6)
    one = fit_decode(pts[:1])  # one size: prior tau kept, eta fitted to pass through the point
    assert 1 / (pts[0].weight_bytes / (one.eta_w * bw) + 40 * one.tau) == pytest.approx(pts[0].tok_s, rel=1e-6)


def test_an_odd_anchor_moves_only_its_neighbours() -> None:
    smooth = [(b, 6.0 * math.exp(300 * math.exp(-1.5 * b))) for b in (3.0, 4.0, 5.0, 6.0, 8.0)]
    odd = [(b, p * (1.05 if b == 4.0 else 1.0)) for b, p in smooth]  # one variant 5 % worse than the curve
    far = quality("exl2", [6.5, 7.0], anchors=odd)
    ref = quality("exl2", [6.5, 7.0], anchors=smooth)
    for a, b in zip(far, ref, strict=True):  # between 6 and 8 bpw the odd 4.0 bpw anchor barely matters
        assert a.value == pytest.approx(b.value, rel=1e-3)
    near = quality("exl2", [4.5], anchors=odd)[0].value
    assert near > 1.01 * quality("exl2", [4.5], anchors=smooth)[0].value  # its neighbours follow it
