"""optimizer.predict.refit: predictions of a whole space, refitted on measurements."""

from __future__ import annotations

from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir

from optimizer.predict.refit import Observation, SpaceEntry, SpacePredictor
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, evaluate
from optimizer.vram import GIB, Split


@pytest.fixture()
def entries(tmp_path: Path) -> list[SpaceEntry]:
    cfg = dict(TINY_LLAMA, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=32000)
    for b in (3.0, 4.0, 5.0, 6.0):
        make_exl2_dir(tmp_path / "m", f"{b}bpw", cfg, bits=b)
    out = []
    for v in discover_local(tmp_path / "m"):
        for cache in ("fp16", "q8", "q4"):
            c = Configuration(variant=v, max_seq_len=4096, cache=cache, split=Split())
            key = f"{v.bits}|{cache}"
            out.append(SpaceEntry(key, c, evaluate(config=c, budget=Budget(per_device=(8 * GIB,)))))
    return out


def test_prior_is_a_ratio_and_falls_with_bits(entries: list[SpaceEntry]) -> None:
    pred = SpacePredictor(entries, gpus=["RTX 4090"]).refit()
    fp16 = [pred[f"{b}|fp16"][0].value for b in (3.0, 4.0, 5.0, 6.0)]
    assert fp16 == sorted(fp16, reverse=True) and all(1.0 < r < 2.0 for r in fp16)
    speed = [pred[f"{b}|fp16"][1].value for b in (3.0, 4.0, 5.0, 6.0)]
    assert speed == sorted(speed, reverse=True)


def test_measurements_make_predictions_absolute_and_follow_a_worse_variant(entries: list[SpaceEntry]) -> None:
    p = SpacePredictor(entries, gpus=["RTX 4090"])
    obs = [Observation("6.0|fp16", 10.0, 300.0), Observation("3.0|fp16", 12.0, 500.0),
           Observation("4.0|fp16", 12.5, 420.0),  # 4.0 bpw measures worse than the curve through its neighbours
           Observation("6.0|q4", 10.2, 290.0)]
    pred = p.refit(obs)
    assert pred["6.0|fp16"][0].value == pytest.approx(10.0)  # measured configurations are their measurement
    # the same variant's other caches follow its own measurement and the measured cache penalty (q4: +2 %)
    assert pred["4.0|q4"][0].value == pytest.approx(12.5 * 10.2 / 10.0, rel=1e-6)
    assert pred["4.0|q4"][0].low < pred["4.0|q4"][0].value < pred["4.0|q4"][0].high
    # an unmeasured variant is predicted in the measured unit, between its measured neighbours
    assert 10.0 < pred["5.0|fp16"][0].value < 12.5


def test_speed_fit_uses_one_slope_and_a_per_cache_intercept(entries: list[SpaceEntry]) -> None:
    p = SpacePredictor(entries, gpus=["RTX 4090"])
    w = {e.key: sum(d.weights for d in e.verdict.devices) for e in entries}
    truth = {k: 1 / (w[k] / 0.9e12 + (0.002 if k.endswith("q4") else 0.001)) for k in w}
    obs = [Observation(k, None, truth[k]) for k in ("6.0|fp16", "3.0|fp16", "6.0|q4")]
    pred = p.refit(obs)
    for k in ("4.0|fp16", "5.0|q4", "3.0|q4"):  # q4 measured at one size only: slope from fp16, its own intercept
        assert pred[k][1].value == pytest.approx(truth[k], rel=0.02)
        assert pred[k][1].low < truth[k] < pred[k][1].high
    unmeasured = pred["4.0|q8"][1]  # q8 never measured: wide interval
    assert unmeasured.high / unmeasured.low > 1.9


def test_an_unmeasured_slope_widens_the_speed_interval_with_the_distance(entries: list[SpaceEntry]) -> None:
    # one measurement per cache at different sizes: the slope is the prior's, not a measurement. On a host that reads
    # weights 30 % slower than the prior's efficiency on this GPU (inside the spread of published hosts), the prior
    # slope mispredicts the other sizes; the interval must still hold the truth instead of claiming +-4 %.
    from optimizer.predict.gpus import find_gpu
    from optimizer.predict.speed import ENGINES

    prior_slope = 1 / (ENGINES["exl2"].eta_w.value * find_gpu("RTX 4090").bandwidth)  # seconds per weight byte
    p = SpacePredictor(entries, gpus=["RTX 4090"])
    w = {e.key: sum(d.weights for d in e.verdict.devices) for e in entries}
    truth = {k: 1 / (1.3 * prior_slope * w[k] + (1.1e-4 if k.endswith("q4") else 1e-4)) for k in w}
    pred = p.refit([Observation(k, None, truth[k]) for k in ("6.0|fp16", "3.0|q4")])
    for k in ("3.0|fp16", "6.0|q4"):
        s = pred[k][1]
        assert s.low < truth[k] < s.high, (k, s, truth[k])
    near, far = pred["5.0|fp16"][1], pred["3.0|fp16"][1]  # further from fp16's measured 6.0 bpw: wider
    assert far.high / far.low > near.high / near.low > 1.04 / 0.96
    # with the slope measured (two fp16 sizes), inside the measured sizes the interval is the tight one again
    pred = p.refit([Observation(k, None, truth[k]) for k in ("6.0|fp16", "3.0|fp16", "3.0|q4")])
    s = pred["4.0|fp16"][1]
    assert s.high / s.low == pytest.approx(1.04 / 0.96) and s.low < truth["4.0|fp16"] < s.high
