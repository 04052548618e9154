"""Autosplit placement reuse (optimizer.study.placement): which configurations may be measured in the placement
made around another one's cache, decided by the VRAM model."""

from __future__ import annotations

from pathlib import Path

import pytest
from exl2_fixtures import make_exl2_dir
from test_study import _big_config

from optimizer.formats import RuntimeOptions
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, evaluate
from optimizer.study.candidates import Candidate
from optimizer.study.placement import in_placement, reusable_pair, shared_placements
from optimizer.vram import MIB, Split

SPLIT = Split(mode="auto", n_devices=2, reserve_bytes=(0, 0))
RT = RuntimeOptions(flash_attn=True)


@pytest.fixture()
def variant(tmp_path: Path):
    make_exl2_dir(tmp_path, "tiny-4.0bpw", _big_config(), bits=4.0)
    return discover_local(tmp_path / "tiny-4.0bpw")[0]


def _cfg(v, ctx: int, cache: str, split: Split = SPLIT) -> Configuration:
    return Configuration(variant=v, max_seq_len=ctx, cache=cache, split=split)


def _budget(dev0_mib: int, margin_mib: int = 0) -> Budget:
    return Budget(per_device=(dev0_mib * MIB, 4096 * MIB), overhead=(0,), margin=(margin_mib * MIB,))


@pytest.mark.parametrize("margin", [0, 48])
@pytest.mark.parametrize("cache,ctx", [("fp16", 32768), ("q4", 32768), ("q8", 8192)])
def test_own_placement_is_the_fresh_load_verdict(variant, cache: str, ctx: int, margin: int) -> None:
    cfg, b = _cfg(variant, ctx, cache), _budget(800, margin)
    assert in_placement(config=cfg, around=cfg, budget=b, runtime=RT) == evaluate(config=cfg, budget=b, runtime=RT)


def test_a_smaller_cache_fits_in_the_placement_made_for_a_larger_one(variant) -> None:
    big, small, b = _cfg(variant, 32768, "fp16"), _cfg(variant, 32768, "q4"), _budget(800)
    vb = evaluate(config=big, budget=b, runtime=RT)
    got = in_placement(config=small, around=big, budget=b, runtime=RT)
    assert vb.fits and got is not None and got.fits
    own = evaluate(config=small, budget=b, runtime=RT)
    # the layers stay where the large cache put them: fewer on GPU 0 than a fresh load of the small cache puts there
    assert [d.n_modules for d in got.devices] == [d.n_modules for d in vb.devices]
    assert got.devices[0].n_modules < own.devices[0].n_modules
    # the small cache on those layers, its staging pair per device holding a layer, RoPE tables of the load
    per_layer = sum(d.cache for d in own.devices) // sum(d.n_kv_layers for d in own.devices)
    staging = max(d.cache_staging for d in own.devices)
    assert staging > 0
    for g in got.devices:
        assert g.cache == g.n_kv_layers * per_layer
        assert g.cache_staging == (staging if g.n_kv_layers else 0)
    assert got.devices[0].rope == vb.devices[0].rope


def test_a_larger_cache_does_not_fit_where_a_smaller_one_packed_gpu0(variant) -> None:
    big, small, b = _cfg(variant, 32768, "fp16"), _cfg(variant, 32768, "q4"), _budget(800)
    assert evaluate(config=big, budget=b, runtime=RT).fits and evaluate(config=small, budget=b, runtime=RT).fits
    got = in_placement(config=big, around=small, budget=b, runtime=RT)
    assert got is not None and not got.fits and "GPU 0 needs" in got.reason and "placement made for" in got.reason


def test_a_margin_must_hold_in_both_placements(variant) -> None:
    """As for a fresh autosplit load: the layers may land as with the overhead assumed, or with the margin used up."""
    big, small = _cfg(variant, 32768, "fp16"), _cfg(variant, 32768, "q4")
    results = {m: in_placement(config=small, around=big, budget=_budget(800, m), runtime=RT) for m in (0, 400)}
    assert results[0] is not None and results[0].fits
    got = results[400]
    fresh = evaluate(config=big, budget=_budget(800, 400), runtime=RT)
    # the verdict kept is the margin-used placement's (the layers the large cache's fresh load puts there)
    assert got is not None and [d.n_modules for d in got.devices] == [d.n_modules for d in fresh.devices]
    assert [d.n_modules for d in got.devices] != [d.n_modules for d in results[0].devices]
    assert all(d.margin == (400 * MIB if d.n_modules else 0) for d in got.devices)


def test_what_the_engine_cannot_share(variant, tmp_path: Path) -> None:
    b = _budget(800)
    base = _cfg(variant, 16384, "fp16")
    assert reusable_pair(_cfg(variant, 8192, "q4"), base, RT)
    assert not reusable_pair(_cfg(variant, 32768, "q4"), base, RT)  # RoPE tables are sized at load
    assert not reusable_pair(_cfg(variant, 1024, "q4"), base, RT)  # a shorter load chunk (min(chunk, ctx))
    assert not reusable_pair(_cfg(variant, 8192, "q4", Split()), _cfg(variant, 16384, "fp16", Split()), RT)
    make_exl2_dir(tmp_path, "other", _big_config(), bits=3.0)
    other = discover_local(tmp_path / "other")[0]
    assert in_placement(config=_cfg(other, 8192, "q4"), around=base, budget=b, runtime=RT) is None


def test_shared_placements_group_each_variant_around_its_roomiest_cache(variant) -> None:
    b = _budget(800)
    cfgs = [_cfg(variant, c, m) for c, m in ((32768, "fp16"), (32768, "q4"), (16384, "q8"), (16384, "fp16"),
                                            (49152, "q4"))]
    cands = [Candidate(config=c, verdict=evaluate(config=c, budget=b, runtime=RT)) for c in cfgs]
    assert all(c.verdict.fits for c in cands), [c.verdict.reason for c in cands]
    got = shared_placements(cands, budget=b, runtime=RT)
    roomy = cfgs[0]  # fp16 at 32k holds the most cache bytes
    assert max(cands, key=lambda c: sum(d.cache + d.cache_staging for d in c.verdict.devices)).config == roomy
    for c in cfgs[:4]:
        assert got[c.key] == roomy
        v = in_placement(config=c, around=roomy, budget=b, runtime=RT)
        assert v is not None and v.fits
    # a longer context than the roomiest's cannot use its RoPE tables: a placement of its own
    assert got[cfgs[4].key] == cfgs[4]
    # the fp16 cache does not fit where q4 at 32k packed GPU 0: without the roomier one it has its own placement
    two = shared_placements([cands[1], Candidate(config=cfgs[0], verdict=cands[0].verdict)], budget=b, runtime=RT)
    assert two == {cfgs[0].key: cfgs[0], cfgs[1].key: cfgs[0]}
    # one GPU: no autosplit placement to share
    one = _cfg(variant, 8192, "q4", Split())
    b1 = Budget(per_device=(800 * MIB,), overhead=(0,))
    assert shared_placements([Candidate(config=one, verdict=evaluate(config=one, budget=b1, runtime=RT))],
                             budget=b1, runtime=RT) == {}


def test_guided_load_keys_per_format(tmp_path: Path) -> None:
    """The schedule groups what one load serves: exl2 by shared placement, EXL3 (placed around each cache, not
    shared) per configuration, GGUF (layers by tensor_split, whatever the cache) per variant and split."""
    pytest.importorskip("gguf")
    import json

    from gguf_util import write_tiny_gguf
    from test_one_front import CFG

    from optimizer.formats import exl3_synth
    from optimizer.safetensors_header import write_header_only
    from optimizer.study import SearchSpec, build_space
    from optimizer.study.guided import Guide

    d3 = tmp_path / "Tiny-exl3-4.0bpw"
    d3.mkdir()
    c3 = {**CFG, "quantization_config": exl3_synth.quantization_config(bits=4.0, head_bits=6)}
    (d3 / "config.json").write_text(json.dumps(c3))
    write_header_only(d3 / "model.safetensors", exl3_synth.synthesize(c3, bits=4.0, head_bits=6))
    make_exl2_dir(tmp_path, "tiny-4.0bpw", _big_config(), bits=4.0)
    write_tiny_gguf(tmp_path / "tiny-f16.gguf", n_embd=128, n_ff=256, context_length=4096)
    variants = tuple(v for p in (tmp_path / "tiny-4.0bpw", d3, tmp_path / "tiny-f16.gguf") for v in discover_local(p))
    spec = SearchSpec(variants=variants, budget=Budget(per_device=(8 << 30,), overhead=(0,)),
                      split=Split(mode="auto", n_devices=2), contexts=(2048, 4096), runtime=RT)
    feasible = [c for c in build_space(spec) if c.verdict.fits]
    guide = Guide(feasible, spec)
    loads: dict[str, set[str]] = {}
    keys = {it.key for it in guide.schedule.items} | {s.item.key for s in guide.schedule.skipped}
    for it in [*guide.schedule.items, *(s.item for s in guide.schedule.skipped)]:
        loads.setdefault(it.key.split(":", 1)[0], set()).add(it.load)
    assert keys == {c.key for c in feasible} and set(loads) == {"exl2", "exl3", "gguf"}
    assert len(loads["exl2"]) == 1 and "around=" in next(iter(loads["exl2"]))
    assert len(loads["gguf"]) == 1 and next(iter(loads["gguf"])).endswith("|auto:2")
    exl3 = [c.key for c in feasible if c.config.variant.format == "exl3"]
    assert len(exl3) > 1 and loads["exl3"] == set(exl3)
