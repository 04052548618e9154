"""The safety margin (``--margin``): its default, what it changes in a verdict, and where it is stated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from typer.testing import CliRunner

from optimizer.cli import app
from optimizer.formats import RuntimeOptions
from optimizer.formats.exl2 import DEFAULT_OVERHEAD_BYTES
from optimizer.sources.local import discover_local
from optimizer.space import (
    MIN_MARGIN_BYTES,
    OVERHEAD_HIGH_BYTES,
    Budget,
    Configuration,
    default_margin,
    evaluate,
    max_context,
)
from optimizer.study.spec import spec_from_record, spec_record
from optimizer.vram import GIB, MIB, Split

EXAMPLE = Path(__file__).resolve().parents[1] / "studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2"


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory):
    cfg = dict(TINY_LLAMA, num_hidden_layers=6, hidden_size=512, intermediate_size=1024, vocab_size=8000,
               max_position_embeddings=16384)
    return discover_local(make_exl2_dir(tmp_path_factory.mktemp("margin"), "m-4.0bpw", cfg, bits=4.0))[0]


def test_default_margin_follows_the_overhead_uncertainty() -> None:
    assumed = default_margin(fmt="exl2", budget=Budget(per_device=(GIB,)))
    assert assumed == (max(MIN_MARGIN_BYTES, OVERHEAD_HIGH_BYTES - DEFAULT_OVERHEAD_BYTES),)
    assert assumed[0] >= MIN_MARGIN_BYTES
    # a given (measured or calibrated) overhead is taken as a measurement
    assert default_margin(fmt="exl2", budget=Budget(per_device=(GIB,), overhead=(900 * MIB,))) == (0,)
    assert default_margin(fmt="exl2", budget=Budget(per_device=(GIB,), margin=(0,))) == (0,)


@pytest.mark.parametrize("split", [Split(), Split(mode="manual", gpu_split=(0.2, 0.2))])
def test_margin_is_kept_free_on_top_of_the_total(variant, split: Split) -> None:
    cfg = Configuration(variant=variant, max_seq_len=4096, cache="fp16", split=split)
    free = evaluate(config=cfg, budget=Budget(per_device=(8 * GIB,), overhead=(0,), margin=(0,)))
    used = [d for d in free.devices if d.n_modules]
    need = max(d.total for d in used)
    for margin in (0, 64 * MIB, 512 * MIB):
        for budget in (need + margin, need + margin - 1):
            v = evaluate(config=cfg, budget=Budget(per_device=(budget,), overhead=(0,), margin=(margin,)))
            assert [d.total for d in v.devices] == [d.total for d in free.devices]  # placement unchanged
            assert v.fits == (budget == need + margin)
            for d in v.devices:
                if d.n_modules:
                    assert d.margin == margin and d.headroom == budget - margin - d.total
            if not v.fits:
                assert "margin" in v.reason or margin == 0


def test_autosplit_must_fit_with_and_without_the_margin_used_up(variant) -> None:
    """Autosplit places by the memory really free: a larger overhead moves modules, it does not OOM the load."""
    rt = RuntimeOptions(flash_attn=True)
    cfg = Configuration(variant=variant, max_seq_len=8192, cache="fp16", split=Split(mode="auto", n_devices=2))
    one = evaluate(config=cfg, budget=Budget(per_device=(64 * GIB,), overhead=(0,), margin=(0,)), runtime=rt)
    per = one.devices[0].total * 6 // 10 + 512 * MIB
    plain = evaluate(config=cfg, budget=Budget(per_device=(per,), overhead=(0,), margin=(0,)), runtime=rt)
    kept = evaluate(config=cfg, budget=Budget(per_device=(per,), overhead=(0,), margin=(128 * MIB,)), runtime=rt)
    assert plain.fits and kept.fits
    # with the margin taken as overhead, GPU 0 holds less and GPU 1 more
    assert kept.devices[0].n_modules <= plain.devices[0].n_modules
    assert all(d.total + d.margin <= d.budget for d in kept.devices)


def test_max_context_shrinks_by_the_margin(variant) -> None:
    probe = Configuration(variant=variant, max_seq_len=8192, cache="fp16", split=Split())
    need = evaluate(config=probe, budget=Budget(per_device=(64 * GIB,), overhead=(100 * MIB,), margin=(0,))).total
    b0 = Budget(per_device=(need,), overhead=(100 * MIB,), margin=(0,))
    b1 = Budget(per_device=(need,), overhead=(100 * MIB,), margin=(8 * MIB,))
    a = max_context(variant=variant, cache="fp16", split=Split(), budget=b0)
    b = max_context(variant=variant, cache="fp16", split=Split(), budget=b1)
    assert a.max_seq_len == 8192 and b.max_seq_len and b.max_seq_len < a.max_seq_len
    assert b.verdict is not None and b.verdict.headroom >= 0


runner = CliRunner()


def test_fit_and_plan_state_the_margin_and_show_headroom_after_it() -> None:
    res = runner.invoke(app, ["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--cache", "q4"])
    assert res.exit_code == 0, res.output
    margin = max(256 * MIB, 1536 * MIB - DEFAULT_OVERHEAD_BYTES)
    assert (f"Safety margin kept free on every GPU: {margin / GIB:.2f} GiB (default: exl2 assumes "
            f"{DEFAULT_OVERHEAD_BYTES // MIB} MiB") in res.output
    rec = json.loads(runner.invoke(app, ["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--cache", "q4",
                                         "--json"]).output)[0]
    off = json.loads(runner.invoke(app, ["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--cache", "q4", "--margin", "0",
                                         "--json"]).output)[0]
    assert off["max_ctx"] > rec["max_ctx"] and 0 <= rec["headroom_gib"] < 0.1
    plan = runner.invoke(app, ["plan", "-m", str(EXAMPLE), "--vram", "15GiB", "--ctx", "4096", "--cache", "q4",
                               "--margin", "512MiB", "--json"])
    (row,) = json.loads(plan.output)
    (dev,) = row["devices"]
    assert dev["margin"] == 512 * MIB and dev["headroom"] == dev["budget"] - dev["margin"] - dev["total"]
    text = runner.invoke(app, ["plan", "-m", str(EXAMPLE), "--vram", "15GiB", "--ctx", "4096", "--margin", "512MiB"])
    assert "Safety margin kept free on every GPU: 0.50 GiB (--margin)" in text.output


def test_search_spec_keeps_the_margin_and_old_studies_keep_their_fingerprint() -> None:
    from optimizer.study import SearchSpec

    (v,) = discover_local(EXAMPLE)
    plain = SearchSpec(variants=(v,), budget=Budget(per_device=(GIB,)), split=Split())
    kept = SearchSpec(variants=(v,), budget=Budget(per_device=(GIB,), margin=(300 * MIB,)), split=Split())
    assert spec_from_record(spec_record(kept)).budget.margin == (300 * MIB,)
    assert spec_from_record(spec_record(plain)).budget.margin is None
    assert "margin" not in plain.fingerprint() and plain.fingerprint() != kept.fingerprint()
