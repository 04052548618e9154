"""Edge cases of the prediction path (plan / fit) found by reading ExLlamaV2 0.3.2's loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir, synth_tensors
from typer.testing import CliRunner

from optimizer.arch import parse_arch
from optimizer.cli import app
from optimizer.cli._common import parse_contexts, split_from
from optimizer.errors import BadOptionError
from optimizer.formats import RuntimeOptions
from optimizer.formats.exl2 import Exl2Settings, memory_plan
from optimizer.formats.exl2_synth import synthesize
from optimizer.recipes.exl2 import run_recipe
from optimizer.safetensors_header import write_header_only
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, evaluate, max_context
from optimizer.vram import GIB, MIB, MemoryPlan, ModuleCost, Split, place

# --- autosplit: placement is decided by the test forward, not by the inference peak ---------------

def test_autosplit_places_by_test_forward_transient_not_inference_peak() -> None:
    """load_autosplit forwards one chunk at past_len 0: a context-sized inference transient does not move modules."""
    big, small = 3 * GIB, 64 * MIB
    mods = tuple(ModuleCost(f"m{i}", GIB, transient_bytes=big, load_transient_bytes=small) for i in range(2))
    plan = MemoryPlan(modules=mods, cache_layer_bytes=0, cache_staging_bytes=0, rope_bytes=0)
    v = place(plan=plan, split=Split(mode="auto", n_devices=2), budgets=(4 * GIB,), overhead_bytes=(0,))
    assert v.placed
    assert v.devices[0].n_modules == 2 and v.devices[1].n_modules == 0
    assert v.devices[0].total == 2 * GIB + big
    assert not v.fits  # the engine loads both on GPU 0 and then OOMs at full context


def test_exl2_test_forward_transient_is_chunk_sized_without_flash_attn() -> None:
    cfg = dict(TINY_LLAMA, num_hidden_layers=2)
    arch = parse_arch(cfg)
    tensors = synth_tensors(cfg, bits=4.0)
    long = memory_plan(arch=arch, tensors=tensors, settings=Exl2Settings(max_seq_len=65536, flash_attn=False))
    short = memory_plan(arch=arch, tensors=tensors, settings=Exl2Settings(max_seq_len=2048, flash_attn=False))
    a_long = next(m for m in long.modules if m.kv_layer)
    a_short = next(m for m in short.modules if m.kv_layer)
    # the inference peak grows with context (SDPA repeat_kv over the whole past), the test forward does not
    assert a_long.transient_bytes > a_short.transient_bytes
    assert a_long.test_transient_bytes == a_short.test_transient_bytes
    assert a_long.test_transient_bytes < a_long.transient_bytes
    # batch: the test forward is batch 1
    b4 = memory_plan(arch=arch, tensors=tensors, settings=Exl2Settings(max_seq_len=2048, batch_size=4))
    head4 = next(m for m in b4.modules if m.name == "lm_head")
    head1 = next(m for m in short.modules if m.name == "lm_head")
    assert head4.transient_bytes > head1.transient_bytes
    assert head4.test_transient_bytes == head1.test_transient_bytes


# --- fit: the binary search answer is the true largest fitting context ------------------------------

@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory):
    cfg = dict(TINY_LLAMA, max_position_embeddings=16384, num_hidden_layers=6, hidden_size=512,
               intermediate_size=1024, vocab_size=8000)
    root = tmp_path_factory.mktemp("edges")
    return discover_local(make_exl2_dir(root, "m-4.0bpw", cfg, bits=4.0))[0]


@pytest.mark.parametrize("cache", ["fp16", "q4"])
@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("mib", [(560, 560), (700, 480), (640, 900), (900,)])
def test_max_context_equals_brute_force(variant, cache: str, flash: bool, mib: tuple[int, ...]) -> None:
    budget = Budget(per_device=tuple(m * MIB for m in mib), overhead=(100 * MIB,))
    split = Split(mode="auto", n_devices=2) if len(mib) == 2 else Split()
    rt = RuntimeOptions(flash_attn=flash)
    fits = [n * 256 for n in range(1, 16384 // 256 + 1)
            if evaluate(config=Configuration(variant=variant, max_seq_len=n * 256, cache=cache, split=split),
                        budget=budget, runtime=rt).fits]
    got = max_context(variant=variant, cache=cache, split=split, budget=budget, runtime=rt)
    assert got.max_seq_len == (max(fits) if fits else None)


# --- recipe: ExLlamaV2 0.3.2 call order -------------------------------------------------------------

def test_recipe_loads_model_before_non_lazy_cache() -> None:
    for split in (Split(), Split(mode="manual", gpu_split=(10.0, 15.5))):
        r = run_recipe(cache="q4", max_seq_len=8192, split=split)
        load = r.index("model.load(")
        assert load < r.index("ExLlamaV2Cache_Q4(model"), r  # cache_map is empty before load
        assert "lazy=True" not in r
    assert "gpu_split=[10, 15.5]" in run_recipe(cache="fp16", max_seq_len=256, split=Split(mode="manual", gpu_split=(10.0, 15.5)))
    r = run_recipe(cache="fp8", max_seq_len=4096, split=Split(mode="auto", n_devices=2))
    assert r.index("ExLlamaV2Cache_8bit(model, max_seq_len=4096, lazy=True)") < r.index("model.load_autosplit(cache)")


def test_recipe_carries_batch_and_chunk() -> None:
    r = run_recipe(cache="fp16", max_seq_len=4096, split=Split(), batch_size=3, chunk_len=512)
    assert "config.max_batch_size = 3" in r and "batch_size=3" in r.split("ExLlamaV2Cache(")[1]
    assert "config.max_input_len = 512" in r
    plain = run_recipe(cache="fp16", max_seq_len=4096, split=Split())
    assert "max_input_len" not in plain and "batch" not in plain


def test_fit_cli_recipe_uses_batch(variant, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["fit", "-m", variant.location.path, "--vram", "8GiB", "--cache", "fp16",
                                   "--batch", "2", "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)[0]
    assert "batch_size=2" in rec["run"] and rec["run"].index("model.load()") < rec["run"].index("ExLlamaV2Cache(")


# --- option parsing -----------------------------------------------------------------------------------

def test_contexts_k_suffix_and_duplicates() -> None:
    assert parse_contexts("16k,8K,16384, 8192") == (8192, 16384)
    for bad in ("0", "-1", "k", "1.5k", ""):
        with pytest.raises(BadOptionError):
            parse_contexts(bad)


def test_split_options() -> None:
    b2 = Budget(per_device=(24 * GIB, 12 * GIB))
    with pytest.raises(BadOptionError):
        split_from(gpus=None, gpu_split="10", budget=b2)  # fewer split entries than listed GPUs
    with pytest.raises(BadOptionError):
        split_from(gpus=1, gpu_split=None, budget=b2)
    assert split_from(gpus=None, gpu_split=None, budget=b2) == Split(mode="auto", n_devices=2)


def test_unequal_budgets_autosplit_respects_each_device(variant) -> None:
    budget = Budget(per_device=(600 * MIB, 2 * GIB), overhead=(100 * MIB,))
    v = evaluate(config=Configuration(variant=variant, max_seq_len=4096, cache="fp16", split=Split(mode="auto", n_devices=2)),
                 budget=budget)
    assert [d.budget for d in v.devices] == [600 * MIB, 2 * GIB]
    assert v.devices[1].n_modules > 0
    assert all(d.total <= d.budget for d in v.devices) == v.fits


# --- local discovery -----------------------------------------------------------------------------------

def test_duplicate_tensor_across_shards_counted_once(tmp_path: Path) -> None:
    d = make_exl2_dir(tmp_path, "m-4.0bpw", TINY_LLAMA, bits=4.0)
    one = discover_local(d)[0]
    # a stray second copy of the head (e.g. a re-saved shard): ExLlamaV2 maps each key to one file
    head = {k: v for k, v in synthesize(json.loads((d / "config.json").read_text()), bits=4.0, head_bits=6).items()
            if k.startswith("lm_head.")}
    write_header_only(d / "zz-extra.safetensors", head)
    two = discover_local(d)[0]
    assert sum(t.nbytes for t in two.tensors) == sum(t.nbytes for t in one.tensors)
    assert len({t.name for t in two.tensors}) == len(two.tensors)
