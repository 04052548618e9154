"""optimizer.schedule: the pure decisions of the prediction-guided search."""

from __future__ import annotations

import random

import pytest

from optimizer.predict import Estimate
from optimizer.schedule import (
    Item,
    Measured,
    Point,
    Schedule,
    dominated_by,
    dominates,
    front_layers,
    largest_context_only,
    paired_decision,
    pareto,
)


def E(v: float, rel: float = 0.0) -> Estimate:
    return Estimate(v, v * (1 - rel), v * (1 + rel))


def item(key: str, ppl: float, tps: float, ctx: int = 4096, *, load: str | None = None, group: str | None = None,
         rel: float = 0.0) -> Item:
    return Item(key=key, load=load or key.split("|")[0], group=group or key, ctx=ctx, ppl=E(ppl, rel), tok_s=E(tps, rel))


def test_dominance_and_front() -> None:
    a, b, c = Point(5.0, 50, 4096), Point(5.0, 40, 4096), Point(4.0, 30, 4096)
    assert dominates(a, b) and not dominates(b, a) and not dominates(a, a)
    assert pareto({"a": a, "b": b, "c": c}) == {"a", "c"}


def test_largest_context_only_keeps_one_per_group() -> None:
    items = [item("v|fp16|2k", 5, 50, 2048, group="v|fp16"), item("v|fp16|8k", 5, 50, 8192, group="v|fp16"),
             item("v|q4|8k", 5.1, 50, 8192, group="v|q4")]
    kept, skipped = largest_context_only(items)
    assert [i.key for i in kept] == ["v|fp16|8k", "v|q4|8k"]
    assert [s.item.key for s in skipped] == ["v|fp16|2k"] and "8192" in skipped[0].reason


def test_front_layers_rank_predicted_points() -> None:
    items = [item("a", 5.0, 50), item("b", 4.0, 30), item("c", 5.5, 40), item("d", 6.0, 20)]
    layers = front_layers(items)
    assert layers["a"] == layers["b"] == 0 and layers["c"] == 1 and layers["d"] == 2


def test_optimistic_bound_protects_uncertain_items() -> None:
    measured = {"m": Point(5.0, 50, 4096)}
    sure = item("x", 5.2, 48, rel=0.01)
    unsure = item("y", 5.2, 48, rel=0.10)  # could be better than the measured point: keep it
    assert dominated_by(sure, measured, margin=0.0) == "m"
    assert dominated_by(unsure, measured, margin=0.0) is None
    assert dominated_by(item("z", 5.02, 49.6), measured, margin=0.01) is None  # the margin keeps near-ties


def test_paired_decision_settles_with_shared_window_noise() -> None:
    rng = random.Random(1)
    difficulty = [rng.gauss(2.0, 0.3) for _ in range(20)]  # large per-window spread shared by both
    ref = [d + rng.gauss(0, 0.002) for d in difficulty]
    worse = [d + 0.02 + rng.gauss(0, 0.002) for d in difficulty]
    dec = None
    for n in range(1, 21):
        dec = paired_decision(worse[:n], ref[:n])
        if dec.settled:
            break
    assert dec is not None and dec.settled and dec.worse is True and dec.n <= 4
    same = [d + rng.gauss(0, 0.002) for d in difficulty]
    assert not paired_decision(same, ref).settled or paired_decision(same, ref).n == 20
    assert not paired_decision(worse[:2], ref[:2]).settled  # never before min_windows


def test_schedule_finishes_the_loaded_variant_then_the_best_predicted() -> None:
    items = [item("a|fp16", 5.0, 40, load="a"), item("a|q4", 5.1, 41, load="a"),
             item("b|fp16", 6.0, 60, load="b"), item("c|fp16", 9.0, 10, load="c")]
    s = Schedule(items)
    order = []
    while (nxt := s.next()) is not None:
        order.append(nxt.key)
        s.record(Measured(nxt.key, nxt.ppl.value, nxt.tok_s.value))
    # a|fp16 (front, best perplexity) first, then a|q4 while a is loaded, then b;
    # c is dominated by a measured point and never measured
    assert order == ["a|fp16", "a|q4", "b|fp16"]
    assert [x.item.key for x in s.skipped] == ["c|fp16"]


def test_schedule_prunes_by_measured_points_and_reports_predictions() -> None:
    items = [item("good", 5.0, 50, rel=0.02), item("bad", 7.0, 30, rel=0.02), item("other", 4.0, 20, rel=0.02)]
    s = Schedule(items)
    s.record(Measured("good", 5.0, 50))
    skipped = {x.item.key: x for x in s.skipped}
    assert "bad" in skipped and "dominated by measured good" in skipped["bad"].reason
    assert "ppl 6.86" in skipped["bad"].reason and skipped["bad"].item.ppl.value == 7.0  # predictions reported
    assert [it.key for it in s.pending()] == ["other"]


def test_refit_moves_predictions_before_pruning() -> None:
    items = [item("a", 5.0, 50, rel=0.01), item("b", 5.1, 49, rel=0.01)]

    def predictor(ms):  # a measurement reveals that everything is 10 % worse than predicted
        return {it.key: (E(it.ppl.value * 1.1, 0.01), E(it.tok_s.value, 0.01)) for it in items}

    s = Schedule(items, predictor=predictor, margin=0.0)
    s.record(Measured("b", 5.6, 49))  # b measured: 5.6; a is now predicted 5.5 +- 1 % with 50 tok/s -> kept
    assert [it.key for it in s.pending()] == ["a"]
    assert s._by_key["a"].ppl.value == pytest.approx(5.5)


def test_threshold_reference_is_the_best_point_that_beats_it_elsewhere() -> None:
    items = [item("x", 5.0, 40, rel=0.05)]
    s = Schedule(items)
    s.measured = {}
    s._by_key.update({"p": item("p", 4.9, 60), "q": item("q", 4.5, 70), "r": item("r", 3.0, 10)})
    s.measured.update({"p": Measured("p", 4.9, 60), "q": Measured("q", 4.5, 70), "r": Measured("r", 3.0, 10)})
    assert s.threshold_reference(items[0]) == "q"


def _lossy_pair(fp16_ctx: int, q4_ctx: int) -> Schedule:
    # q4 predicted *better* than fp16 (a poor prior), in one load: the rule, not the prediction, must decide
    fp16 = Item(key="v|fp16", load="v", group="v|fp16", ctx=fp16_ctx, ppl=E(5.0, 0.1), tok_s=E(40, 0.2))
    q4 = Item(key="v|q4", load="v", group="v|q4", ctx=q4_ctx, ppl=E(4.9, 0.1), tok_s=E(45, 0.2), lossless="v|fp16")
    return Schedule([q4, fp16])


def test_a_lossy_cache_waits_for_its_lossless_sibling_and_is_skipped_when_it_adds_no_context() -> None:
    s = _lossy_pair(8192, 8192)
    first = s.next()
    assert first is not None and first.key == "v|fp16"  # despite q4's better prediction
    new = s.record(Measured("v|fp16", 5.0, 40.0))
    assert [x.item.key for x in new] == ["v|q4"] and "lossy copy" in new[0].reason and "v|fp16" in new[0].reason
    assert s.next() is None


def test_a_lossy_cache_with_more_context_is_measured() -> None:
    s = _lossy_pair(4096, 8192)
    assert s.lossless_sibling(s.item("v|q4")) is None
    s.record(Measured("v|fp16", 5.0, 40.0))
    nxt = s.next()
    assert nxt is not None and nxt.key == "v|q4"


def test_a_lossy_cache_is_measured_when_its_sibling_fails_and_skipped_when_it_is_dominated() -> None:
    s = _lossy_pair(8192, 8192)
    s.drop("v|fp16")  # the fp16 load failed: nothing vouches for q4
    nxt = s.next()
    assert nxt is not None and nxt.key == "v|q4"
    s = _lossy_pair(8192, 8192)
    new = s.skip(s.item("v|fp16"), "dominated by measured w")
    assert [x.item.key for x in new] == ["v|fp16", "v|q4"] and "dominated by measured w" in new[1].reason
    assert s.next() is None


def test_another_workers_result_does_not_change_the_load_held_here_and_busy_items_stay_pending() -> None:
    items = [item("a|fp16", 5.0, 40, load="a"), item("a|q4", 5.1, 41, load="a"),
             item("b|fp16", 6.0, 60, load="b"), item("b|q4", 6.1, 61, load="b")]
    s = Schedule(items)
    s.record(Measured("a|fp16", 5.0, 40))  # measured here: a is loaded
    s.record(Measured("b|fp16", 6.0, 60), own=False)  # measured by another worker
    assert s.loaded == "a"
    assert s.next().key == "a|q4"
    # a|q4 running on another worker: b's next, and a|q4 is still pending (a failure there lets it be retried)
    assert s.next(exclude={"a|q4"}).key == "b|q4"
    assert "a|q4" in {it.key for it in s.pending()}
    assert s.next(exclude={"a|q4", "b|q4"}) is None
