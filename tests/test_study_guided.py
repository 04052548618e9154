"""The prediction-guided study loop (``exhaustive=False``): same front as measuring everything, fewer measurements,
skipped configurations stored with predictions and reason, and an exhaustive rerun measures them."""

from __future__ import annotations

from pathlib import Path

from fake_engine import FakeBackend, fake_ppl, fake_speed
from test_study import _front, _run, _spec, variants_dir  # noqa: F401  (fixture)

from optimizer.evaldata import EvalText
from optimizer.study import build_space, open_study, run


def _truth(spec) -> dict[str, tuple[float, float, float]]:
    out = {}
    for c in build_space(spec):
        if c.verdict.fits:
            fill = min(spec.speed_protocol.context_fill, c.config.max_seq_len - spec.speed_protocol.gen_tokens)
            out[c.key] = (fake_ppl(c.config.variant, c.config.cache),
                          fake_speed(c.config.variant, c.config.cache, "1gpu", fill)[1], float(c.config.max_seq_len))
    return out


def test_guided_finds_the_whole_front_with_fewer_measurements(variants_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    spec = _spec(variants_dir)
    truth = _truth(spec)
    be = FakeBackend()
    res = _run(spec, tmp_path, be, exhaustive=False, gpus=("RTX 4090",))
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    measured = {t.user_attrs["config_key"] for t in study.trials if t.user_attrs.get("status") == "measured"}
    skipped = [t for t in study.trials if t.user_attrs.get("status") == "skipped"]
    assert _front(truth) <= measured  # recall 1.0
    assert res.n_measured == len(measured) < len(truth)
    assert res.n_skipped == len(skipped) == len(truth) - len(measured)
    for t in skipped:
        ua = t.user_attrs
        assert ua["reason"] and ua["predicted_ppl_low"] <= ua["predicted_ppl"] <= ua["predicted_ppl_high"]
        assert ua["predicted_gen_tok_s_low"] <= ua["predicted_gen_tok_s"] <= ua["predicted_gen_tok_s_high"]
    assert {t.user_attrs["config_key"] for t in study.best_trials} == _front({k: truth[k] for k in measured})
    # skipped is not done: an exhaustive rerun of the same study measures exactly the skipped ones
    be2 = FakeBackend()
    res2 = _run(spec, tmp_path, be2, exhaustive=True)
    assert res2.n_measured == len(truth) - len(measured)


def _fp16_q8_spec(variants_dir: Path):  # noqa: F811
    from dataclasses import replace

    spec = _spec(variants_dir, vram="4GiB", contexts=(2048,), caches=("fp16", "q8"))
    return replace(spec, eval_protocol=replace(spec.eval_protocol, n_windows=8),
                   variants=tuple(v for v in spec.variants if v.bits == 4.0))


def test_paired_windows_stop_a_dominated_cache_after_a_few_windows(variants_dir: Path, tmp_path: Path,  # noqa: F811
                                                                    monkeypatch) -> None:
    from optimizer.formats import exl2_rules

    # one context, fp16 and q8: q8 is slower and worse (fake landscape), so once fp16 is measured, q8's speed test
    # shows fp16 is as fast with as much context, and its first windows settle it worse: skipped, not finished.
    # (Without exl2's lossless-cache rule, which would skip q8 unmeasured: the paired test serves every format.)
    monkeypatch.delattr(exl2_rules, "LOSSLESS_CACHE")
    spec = _fp16_q8_spec(variants_dir)
    be = FakeBackend()
    text = "hello world " * 200
    res = run(spec=spec, study_name="p", backend_factory=lambda v: be, root=tmp_path / "studies",
              eval_text=lambda: EvalText(dataset_id="fake:2", text=text),
              exhaustive=False, gpus=("RTX 4090",))
    study = open_study(study_name="p", storage_url=None, root=tmp_path / "studies", create=False)
    by_cache = {t.user_attrs["cache"]: t.user_attrs for t in study.trials if t.user_attrs.get("config_key")}
    assert by_cache["fp16"]["status"] == "measured"
    assert by_cache["q8"]["status"] == "skipped" and "shared windows" in by_cache["q8"]["reason"]
    ppl_calls = [k for what, k in be.engine.calls if what == "ppl"]
    assert sum(1 for k in ppl_calls if k.endswith("|q8")) == 3  # min_windows, not all 8
    assert sum(1 for k in ppl_calls if k.endswith("|fp16")) == 8
    assert res.n_measured == 1 and res.n_skipped == 1


def test_a_lossy_cache_with_no_more_context_than_fp16_is_never_loaded(variants_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    # exllamav2 decodes Q8 to FP16 every step: with the same context, q8 can only be slower and no better, so once
    # fp16 is measured it is skipped without a cache build, a speed test or a window
    spec = _fp16_q8_spec(variants_dir)
    be = FakeBackend()
    res = run(spec=spec, study_name="l", backend_factory=lambda v: be, root=tmp_path / "studies",
              eval_text=lambda: EvalText(dataset_id="fake:2", text="hello world " * 200),
              exhaustive=False, gpus=("RTX 4090",))
    study = open_study(study_name="l", storage_url=None, root=tmp_path / "studies", create=False)
    by_cache = {t.user_attrs["cache"]: t.user_attrs for t in study.trials if t.user_attrs.get("config_key")}
    assert by_cache["fp16"]["status"] == "measured"
    q8 = by_cache["q8"]
    assert q8["status"] == "skipped" and "lossy copy" in q8["reason"] and by_cache["fp16"]["config_key"] in q8["reason"]
    assert [w for w, k in be.engine.calls if "|q8" in k] == []  # no cache build, speed test or window
    assert [w for w, k in be.engine.calls if "|fp16" in k].count("ppl") == 8
    assert res.n_measured == 1 and res.n_skipped == 1


def test_guided_autosplit_loads_each_variant_once_and_exhaustive_reloads(variants_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from dataclasses import replace

    from optimizer.report import write_reports
    from optimizer.study.placement import shared_placements
    from optimizer.vram import Split

    spec = replace(_spec(variants_dir, vram="0.8GiB"), split=Split(mode="auto", n_devices=2))
    feasible = [c for c in build_space(spec) if c.verdict.fits]
    around = shared_placements(feasible, budget=spec.budget, runtime=spec.runtime)
    assert len({a.key for a in around.values()}) == len({c.config.variant.key for c in feasible})  # one per variant
    be = FakeBackend()
    res = _run(spec, tmp_path, be, exhaustive=False, gpus=("RTX 4090",))
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    measured = [t.user_attrs for t in study.trials if t.user_attrs.get("status") == "measured"]
    loads = [k for what, k in be.engine.calls if what == "load"]
    assert len(measured) > len(loads) == len(set(loads)) == len({ua["variant"] for ua in measured})
    assert res.model_loads == len(loads)
    shared = [ua for ua in measured if ua.get("placement_of")]
    assert shared  # measured in a placement made for another cache (or kept from an earlier load)
    for ua in measured:
        assert ua.get("placement_of", "") in ("", around[ua["config_key"]].key)
    # the report does not present their memory as a measurement of their own load
    write_reports(study=study, out_dir=tmp_path / "rep", plots=False)
    import csv

    rows = {r["config_key"]: r for r in csv.DictReader((tmp_path / "rep" / "trials.csv").open())}
    for ua in shared:
        r = rows[ua["config_key"]]
        assert r["placement_of"] == ua["placement_of"] and r["measured_vram_gib"] == "" and r["predicted_vram_gib"]
    own = [ua for ua in measured if not ua.get("placement_of")]
    assert all(rows[ua["config_key"]]["measured_vram_gib"] for ua in own)
    # --exhaustive: a fresh autosplit load for every configuration (each verifies its own load)
    be2 = FakeBackend()
    res2 = run(spec=spec, study_name="x", backend_factory=lambda v: be2, root=tmp_path / "studies",
               eval_text=lambda: EvalText(dataset_id="fake:1", text="hello world " * 50), exhaustive=True)
    assert res2.n_measured == len(feasible) == sum(1 for what, _ in be2.engine.calls if what == "load")
    ex = open_study(study_name="x", storage_url=None, root=tmp_path / "studies", create=False)
    assert not any(t.user_attrs.get("placement_of") for t in ex.trials)


def test_out_of_memory_in_a_shared_placement_falls_back_to_a_load_of_its_own(variants_dir: Path,  # noqa: F811
                                                                               tmp_path: Path) -> None:
    from dataclasses import replace

    from optimizer.vram import Split

    spec = replace(_spec(variants_dir, vram="0.8GiB"), split=Split(mode="auto", n_devices=2))
    be = FakeBackend()
    _run(spec, tmp_path, be, exhaustive=False, gpus=("RTX 4090",))
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    shared = next(t.user_attrs for t in study.trials if t.user_attrs.get("placement_of")
                  and t.user_attrs["placement_of"] != t.user_attrs["config_key"])
    victim = f"{shared['cache']}@{shared['max_seq_len']}"
    be2 = FakeBackend()
    be2.engine.oom_in_shared = {victim}
    run(spec=spec, study_name="o", backend_factory=lambda v: be2, root=tmp_path / "studies",
        eval_text=lambda: EvalText(dataset_id="fake:1", text="hello world " * 50), exhaustive=False, gpus=("RTX 4090",))
    o = open_study(study_name="o", storage_url=None, root=tmp_path / "studies", create=False)
    got = [t.user_attrs for t in o.trials if t.user_attrs.get("config_key") == shared["config_key"]]
    assert len(got) == 1 and got[0]["status"] == "measured" and not got[0].get("placement_of")
    assert any(what == "oom" and k.endswith("|shared") for what, k in be2.engine.calls)
    assert len([1 for what, _ in be2.engine.calls if what == "load"]) > len([1 for what, _ in be.engine.calls if what == "load"])


def test_a_resumed_guided_search_writes_no_skip_twice_and_finds_the_front(variants_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from collections import Counter

    spec = _spec(variants_dir)
    truth = _truth(spec)
    for n in (2, 2, None):  # stopped by --n-trials twice, then to the end
        _run(spec, tmp_path, FakeBackend(), exhaustive=False, gpus=("RTX 4090",), n_trials=n)
    study = open_study(study_name="s", storage_url=None, root=tmp_path / "studies", create=False)
    outcomes = Counter(t.user_attrs["config_key"] for t in study.trials
                       if t.user_attrs.get("status") in ("measured", "skipped"))
    assert set(outcomes) == set(truth) and set(outcomes.values()) == {1}, outcomes
    measured = {t.user_attrs["config_key"] for t in study.trials if t.user_attrs.get("status") == "measured"}
    assert _front(truth) <= measured < set(truth)
