"""GGUF multi-GPU layer split and partial offload through ``optimizer.space.evaluate``.

The per-device numbers must be llama.cpp's LAYER split rules (``gguf.predict_devices``), the parts
of every device must add up to its total, totals must match what the header alone says, and fewer
offloaded layers must never need more device memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf_util import write_tiny_gguf

from optimizer.formats import RuntimeOptions
from optimizer.formats.gguf import LlamaSettings, predict_devices, row_bytes
from optimizer.formats.gguf_rules import model_of, place_config, settings_for
from optimizer.sources.gguf_local import discover_gguf
from optimizer.space import Budget, Configuration, evaluate, max_context
from optimizer.variant import Variant
from optimizer.vram import GIB, MIB, Split, place

N_LAYER = 6
OVERHEAD = 7 * MIB
SPLITS = {
    1: Split(mode="single"),
    2: Split(mode="auto", n_devices=2),
    3: Split(mode="auto", n_devices=3),
}


@pytest.fixture(scope="module")
def variant(tmp_path_factory: pytest.TempPathFactory) -> Variant:
    d = tmp_path_factory.mktemp("gguf-split")
    write_tiny_gguf(d / "tiny-F16.gguf", n_layer=N_LAYER, n_embd=64, n_ff=128)
    (v,) = discover_gguf(d / "tiny-F16.gguf")
    return v


@pytest.fixture(scope="module")
def odd_head_variant(tmp_path_factory: pytest.TempPathFactory) -> Variant:
    """Head dimension 18: no quantized KV type (block 32) divides it."""
    d = tmp_path_factory.mktemp("gguf-odd")
    write_tiny_gguf(d / "odd-F16.gguf", n_layer=2, n_embd=72, n_ff=128, n_head=4, n_head_kv=2)
    (v,) = discover_gguf(d / "odd-F16.gguf")
    return v


def _eval(v: Variant, split: Split, *, ngl: int | None = None, ctx: int = 1024, cache: str = "f16",
          budget: int = 1 * GIB):
    cfg = Configuration(variant=v, max_seq_len=ctx, cache=cache, split=split)
    return evaluate(config=cfg, budget=Budget(per_device=(budget,), overhead=(OVERHEAD,)),
                    runtime=RuntimeOptions(n_gpu_layers=ngl))


def _proportions(split: Split) -> tuple[float, ...]:
    if split.mode == "manual":
        return split.gpu_split
    return (1.0,) * split.n_devices


@pytest.mark.parametrize("n_dev", [1, 2, 3])
@pytest.mark.parametrize("ngl", [None, 0, 1, 2, 4, N_LAYER, N_LAYER + 1])
def test_devices_follow_predict_devices_and_add_up(variant, n_dev, ngl):
    split = SPLITS[n_dev]
    verdict = _eval(variant, split, ngl=ngl)
    s = settings_for(max_seq_len=1024, cache="f16", runtime=RuntimeOptions(n_gpu_layers=ngl))
    preds = predict_devices(model_of(variant), s, tensor_split=_proportions(split))
    assert verdict.placed and len(verdict.devices) == n_dev == len(preds)
    for d, p in zip(verdict.devices, preds, strict=True):
        assert (d.weights, d.cache, d.transient) == (p.weights, p.kv, p.compute)
        assert d.overhead == OVERHEAD
        assert d.total == d.overhead + d.weights + d.cache + d.cache_staging + d.scratch + d.rope + d.transient
    assert verdict.total == sum(d.total for d in verdict.devices)
    assert sum(d.n_modules for d in verdict.devices) == (N_LAYER + 1 if ngl is None else min(ngl, N_LAYER + 1))


def test_full_offload_totals_match_the_header(variant):
    """All layers offloaded: weights are every tensor but token_embd; KV is cells x layers x K+V rows."""
    m = model_of(variant)
    hd = 64 // 4
    kv_row = row_bytes("f16", 2 * hd) * 2  # K and V, 2 KV heads
    expected_w = sum(t.nbytes for t in variant.tensors if not t.name.startswith("token_embd."))
    for n_dev in (1, 2, 3):
        v = _eval(variant, SPLITS[n_dev], ctx=1000)  # padded to 1024 cells
        assert sum(d.weights for d in v.devices) == expected_w
        assert sum(d.cache for d in v.devices) == 1024 * N_LAYER * kv_row
        assert sum(d.n_kv_layers for d in v.devices) == m.n_layer
        assert all(d.weights > 0 for d in v.devices)


def test_even_split_spreads_layers_and_output_goes_last(variant):
    v3 = _eval(variant, SPLITS[3])
    layers = [d.n_kv_layers for d in v3.devices]
    assert max(layers) - min(layers) <= 1 + 1  # 6 layers + output over 3 GPUs
    m = model_of(variant)
    # the output layer (biggest module here) sits on the last device: its weights exceed its layers'
    last = v3.devices[-1]
    assert last.weights >= m.output_bytes
    assert v3.devices[0].weights == sum(m.layer_bytes[: layers[0]])


def test_manual_split_means_proportions(variant):
    a = _eval(variant, Split(mode="manual", gpu_split=(1, 3)))
    b = _eval(variant, Split(mode="manual", gpu_split=(10, 30)))
    assert [d.n_kv_layers for d in a.devices] == [d.n_kv_layers for d in b.devices]
    assert a.devices[0].n_kv_layers < a.devices[1].n_kv_layers
    assert sum(d.n_kv_layers for d in a.devices) == N_LAYER


@pytest.mark.parametrize("n_dev", [1, 2, 3])
def test_fewer_offloaded_layers_never_need_more(variant, n_dev):
    prev_peak = prev_total = None
    for ngl in range(N_LAYER + 1, -1, -1):
        v = _eval(variant, SPLITS[n_dev], ngl=ngl, ctx=2048)
        peak = max(d.total for d in v.devices)
        if prev_peak is not None:
            assert peak <= prev_peak and v.total <= prev_total
        prev_peak, prev_total = peak, v.total
    zero = _eval(variant, SPLITS[n_dev], ngl=0)
    assert all(d.weights == d.cache == d.transient == 0 for d in zero.devices)


def test_partial_offload_keeps_the_first_layers_on_the_host(variant):
    m = model_of(variant)
    v = _eval(variant, SPLITS[1], ngl=3)  # output + blk.4 + blk.5
    d = v.devices[0]
    assert d.weights == m.output_bytes + m.layer_bytes[4] + m.layer_bytes[5]
    assert d.n_kv_layers == 2


def test_single_matches_the_memory_plan_placement(variant):
    """With one GPU the layer-split path agrees with the MemoryPlan placed by ``vram.place``."""
    from optimizer.formats.gguf_rules import variant_plan

    for ngl in (None, 3):
        rt = RuntimeOptions(n_gpu_layers=ngl)
        got = _eval(variant, SPLITS[1], ngl=ngl).devices[0]
        plan = variant_plan(variant, max_seq_len=1024, cache="f16", runtime=rt)
        ref = place(plan=plan, split=Split(), budgets=(GIB,), overhead_bytes=(OVERHEAD,)).devices[0]
        assert (got.weights, got.cache, got.transient, got.total) == (ref.weights, ref.cache, ref.transient, ref.total)


def test_budget_verdict_per_device(variant):
    one = _eval(variant, SPLITS[1])
    need = one.devices[0].total
    assert _eval(variant, SPLITS[1], budget=need).fits
    assert not _eval(variant, SPLITS[1], budget=need - 1).fits
    two = _eval(variant, SPLITS[2], budget=need // 2 + OVERHEAD)
    assert max(d.total for d in two.devices) < need
    assert two.fits == all(d.total <= d.budget for d in two.devices)


def test_kv_type_that_does_not_divide_the_head_is_infeasible_not_fatal(odd_head_variant):
    v = odd_head_variant
    for cache in ("q8_0", "q4_0", "q8_0/f16"):
        verdict = _eval(v, SPLITS[2], cache=cache)
        assert not verdict.placed and not verdict.fits
        assert "multiple of 32" in verdict.reason
    assert _eval(v, SPLITS[2], cache="f16").placed
    fr = max_context(variant=v, cache="q4_0", split=SPLITS[1], budget=Budget(per_device=(GIB,)), runtime=RuntimeOptions())
    assert fr.max_seq_len is None
    with pytest.raises(Exception, match="multiple of 32"):
        predict_devices(model_of(v), LlamaSettings(n_ctx=256, type_k="q4_0", type_v="q4_0", flash_attn=True))


def test_place_config_is_the_hook_evaluate_uses(variant):
    split = SPLITS[2]
    direct = place_config(variant, max_seq_len=1024, cache="q8_0", split=split, runtime=RuntimeOptions(),
                          budget_per_device=(GIB, 2 * GIB), overhead_per_device=(OVERHEAD,))
    via = evaluate(config=Configuration(variant=variant, max_seq_len=1024, cache="q8_0", split=split),
                   budget=Budget(per_device=(GIB, 2 * GIB), overhead=(OVERHEAD,)))
    assert direct.devices == via.devices
    assert [d.budget for d in via.devices] == [GIB, 2 * GIB]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-m", "optimizer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_plan_cli_two_gpus_and_n_gpu_layers(variant, tmp_path):
    d = str(Path(variant.location.path or "").parent)
    r = _cli("plan", "-m", d, "--vram", "1GB", "--gpus", "2", "--ctx", "1024", "--cache", "f16", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 1 and len(rows[0]["devices"]) == 2
    want = _eval(variant, SPLITS[2], budget=10**9)
    for got, dev in zip(rows[0]["devices"], want.devices, strict=True):
        assert got["weights"] == dev.weights and got["cache"] == dev.cache and got["transient"] == dev.transient
        assert got["total"] == sum(got[k] for k in ("overhead", "weights", "cache", "cache_staging", "scratch",
                                                     "rope", "transient"))
    r2 = _cli("plan", "-m", d, "--vram", "1GB", "--gpus", "2", "--ctx", "1024", "--cache", "f16", "--json",
              "--n-gpu-layers", "2", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    part = json.loads(r2.stdout)[0]["devices"]
    assert sum(x["weights"] for x in part) < sum(x["weights"] for x in rows[0]["devices"])
    assert sum(x["modules"] for x in part) == 2
    r3 = _cli("plan", "-m", d, "--vram", "1GB", "--gpus", "2", "--json", "--n-gpu-layers", "-1", cwd=tmp_path)
    assert r3.returncode == 2


def test_llamacpp_backend_passes_the_split_and_offload(variant):
    """The engine loads with the tensor_split / n_gpu_layers the memory model assumed."""
    pytest.importorskip("llama_cpp")
    import llama_cpp

    from optimizer.backends.base import LoadSpec
    from optimizer.backends.llamacpp import LlamaCppEngine, _model_params

    for split, want in ((Split(mode="single"), (1.0,)), (Split(mode="auto", n_devices=3), (1.0, 1.0, 1.0)),
                        (Split(mode="manual", gpu_split=(10, 15)), (10.0, 15.0))):
        mp = _model_params(n_gpu_layers=3, dry=False, split=split)
        assert mp.n_gpu_layers == 3 and mp.split_mode == llama_cpp.LLAMA_SPLIT_MODE_LAYER
        got = tuple(mp.tensor_split[i] for i in range(int(llama_cpp.LLAMA_MAX_DEVICES)))
        assert got[: len(want)] == want and not any(got[len(want):])
    assert _model_params(n_gpu_layers=None, dry=False).n_gpu_layers == -1
    eng = LlamaCppEngine(n_threads=1)
    try:
        spec = LoadSpec(variant=variant, split=Split(mode="auto", n_devices=2), max_seq_len=256, cache="f16",
                        chunk_len=64, n_gpu_layers=2)
        assert eng.prepare(spec).model_loaded
        assert not eng.prepare(spec).model_loaded
        assert eng.prepare(LoadSpec(variant=variant, split=spec.split, max_seq_len=256, cache="f16",
                                    chunk_len=64, n_gpu_layers=None)).model_loaded, "n_gpu_layers changes the model"
    finally:
        eng.close()
