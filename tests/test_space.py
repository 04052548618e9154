"""Placement, grid enumeration and max-context search on synthesized exl2 variants."""

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir

from optimizer.formats import RuntimeOptions
from optimizer.formats.exl2 import DEFAULT_OVERHEAD_BYTES
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, auto_contexts, enumerate_configs, evaluate, max_context
from optimizer.vram import MIB, Split


@pytest.fixture()
def variants(tmp_path):
    make_exl2_dir(tmp_path, "4.0bpw", TINY_LLAMA, bits=4.0)
    make_exl2_dir(tmp_path, "6.0bpw", TINY_LLAMA, bits=6.0)
    return discover_local(tmp_path)


def test_dir_of_variant_dirs_gives_one_variant_each(variants):
    assert [v.label for v in variants] == ["4.0bpw-h6", "6.0bpw-h6"]
    assert variants[0].total_bytes < variants[1].total_bytes


def test_auto_contexts_end_at_model_default():
    assert auto_contexts(200000) == (2048, 4096, 8192, 16384, 32768, 65536, 131072, 199936)
    assert auto_contexts(4096) == (2048, 4096)


def test_enumerate_is_variant_major(variants):
    cfgs = enumerate_configs(variants=variants, contexts=(1024, 2048), caches=("fp16", "q4"), split=Split())
    assert len(cfgs) == 8
    assert [c.variant.label for c in cfgs[:4]] == ["4.0bpw-h6"] * 4
    assert len({c.key for c in cfgs}) == 8


def test_breakdown_parts_add_up_and_weights_exclude_embedding(variants):
    v = variants[0]
    cfg = Configuration(variant=v, max_seq_len=4096, cache="fp16", split=Split())
    verdict = evaluate(config=cfg, budget=Budget(per_device=(10**9,)))
    (d,) = verdict.devices
    embed = 1024 * 256 * 2
    assert d.weights == v.total_bytes - embed
    assert d.total == d.overhead + d.weights + d.cache + d.cache_staging + d.scratch + d.rope + d.transient
    assert d.cache == 4 * 2 * 4096 * 2 * 32 * 2  # layers x (K,V) x tokens x kv_dim(2x32) x 2 B
    assert d.overhead == DEFAULT_OVERHEAD_BYTES


def test_max_context_is_the_boundary(variants):
    v = variants[0]
    budget = Budget(per_device=(515 * MIB,), overhead=(500 * MIB,), margin=(0,))
    rt = RuntimeOptions(flash_attn=True)  # no chunk^2 attention scores: the cache decides the boundary
    res = max_context(variant=v, cache="fp16", split=Split(), budget=budget, runtime=rt)
    assert res.max_seq_len is not None and res.max_seq_len % 256 == 0 and res.max_seq_len < res.default_ctx
    ok = evaluate(config=Configuration(variant=v, max_seq_len=res.max_seq_len, cache="fp16", split=Split()),
                  budget=budget, runtime=rt)
    over = evaluate(config=Configuration(variant=v, max_seq_len=res.max_seq_len + 256, cache="fp16", split=Split()),
                    budget=budget, runtime=rt)
    assert ok.fits and not over.fits
    q4 = max_context(variant=v, cache="q4", split=Split(), budget=budget, runtime=rt)
    assert q4.max_seq_len is not None and q4.max_seq_len > res.max_seq_len


def test_autosplit_moves_layers_to_second_gpu_when_first_is_full(variants):
    v = variants[1]
    # flash-attention: the inference peak equals load_autosplit's test forward (without it, SDPA's
    # context-sized repeat_kv is not seen by the test forward and the engine keeps modules on GPU 0)
    rt = RuntimeOptions(flash_attn=True)
    big = Budget(per_device=(4 * 1024 * MIB,), overhead=(0,), margin=(0,))
    one = evaluate(config=Configuration(variant=v, max_seq_len=8192, cache="fp16", split=Split(mode="auto", n_devices=2)),
                   budget=big, runtime=rt)
    assert one.fits and one.devices[1].n_modules == 0
    need = one.devices[0].total
    tight = Budget(per_device=(need * 9 // 10 + 256 * MIB,), overhead=(0,), margin=(0,))
    no_reserve = Split(mode="auto", n_devices=2, reserve_bytes=(0, 0))
    two = evaluate(config=Configuration(variant=v, max_seq_len=8192, cache="fp16", split=no_reserve), budget=tight, runtime=rt)
    assert two.fits
    assert two.devices[1].n_modules > 0 and two.devices[1].n_kv_layers > 0
    assert sum(d.n_modules for d in two.devices) == sum(d.n_modules for d in one.devices)
    assert two.devices[1].scratch == two.devices[0].scratch  # autosplit: global scratch on every device


def test_autosplit_refuses_when_all_gpus_full(variants):
    v = variants[1]
    tiny = Budget(per_device=(300 * MIB,), overhead=(0,))
    res = evaluate(config=Configuration(variant=v, max_seq_len=65536, cache="fp16", split=Split(mode="auto", n_devices=2)), budget=tiny)
    assert not res.placed and not res.fits and "Insufficient VRAM" in res.reason


def test_manual_split_respects_allocation(variants):
    v = variants[1]
    cfg = Configuration(variant=v, max_seq_len=2048, cache="q4", split=Split(mode="manual", gpu_split=(0.0012, 10.0)))
    res = evaluate(config=cfg, budget=Budget(per_device=(8 * 1024 * MIB,)), runtime=RuntimeOptions(chunk_len=16, flash_attn=True))
    assert res.placed
    assert res.devices[0].n_modules < res.devices[0].n_modules + res.devices[1].n_modules
    assert res.devices[1].n_modules > 0


@pytest.mark.parametrize("split", [Split(), Split(mode="manual", gpu_split=(4.0, 4.0)), Split(mode="auto", n_devices=2)])
def test_context_past_chunk_squared_without_flash_attn_is_unplaced(variants, split):
    """exllamav2 0.3.2 cannot advance a prompt past chunk**2 tokens without flash-attn (the chunk rounds to 0)."""
    v = variants[0]
    budget = Budget(per_device=(8 * 1024 * MIB,))
    ok = evaluate(config=Configuration(variant=v, max_seq_len=256, cache="fp16", split=split), budget=budget,
                  runtime=RuntimeOptions(chunk_len=16))  # 16**2 == 256: the last chunk still advances
    stalls = evaluate(config=Configuration(variant=v, max_seq_len=512, cache="fp16", split=split), budget=budget,
                      runtime=RuntimeOptions(chunk_len=16))
    flash = evaluate(config=Configuration(variant=v, max_seq_len=512, cache="fp16", split=split), budget=budget,
                     runtime=RuntimeOptions(chunk_len=16, flash_attn=True))
    assert ok.placed and flash.placed
    assert not stalls.placed and not stalls.fits and "chunk squared" in stalls.reason
    got = max_context(variant=v, cache="fp16", split=split, budget=budget, runtime=RuntimeOptions(chunk_len=16))
    assert got.max_seq_len is not None and got.max_seq_len <= 256
