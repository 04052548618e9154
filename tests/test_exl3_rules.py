"""EXL3 memory rules without the library: cache modes, settings, placement over GPUs, the CLI's JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from oracle_util import REAL_CONFIGS, tiny_config

from optimizer.errors import BadOptionError, ModelConfigError, UnsupportedArchitectureError
from optimizer.formats import RuntimeOptions
from optimizer.formats.exl3 import (
    CACHE_MODE_NAMES,
    Exl3Settings,
    cache_mode,
    check_architecture,
)
from optimizer.formats.exl3_place import DEFAULT_RESERVE_BYTES, refuse_tensor_parallel
from optimizer.formats.exl3_qconfig import tensors_from_quantization_config
from optimizer.formats.exl3_rules import modules_of, place_config, variant_plan
from optimizer.formats.exl3_synth import allocate_bits, quantization_config, synthesize
from optimizer.recipes import RunSpec, recipe
from optimizer.safetensors_header import write_header_only
from optimizer.sources.local import discover_local
from optimizer.variant import Variant
from optimizer.vram import GIB, MIB, Split


def _dir(tmp: Path, cfg: dict[str, Any], bits: float = 4.0, head_bits: int = 6) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "quantization_config": quantization_config(bits=bits, head_bits=head_bits)}
    (tmp / "config.json").write_text(json.dumps(cfg))
    write_header_only(tmp / "model.safetensors", synthesize(cfg, bits=bits, head_bits=head_bits))
    return tmp


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory: pytest.TempPathFactory) -> Variant:
    d = _dir(tmp_path_factory.mktemp("l3") / "Llama-3-8B-exl3-4.0bpw", REAL_CONFIGS["Llama-3-8B"])
    (v,) = discover_local(d)
    return v


def test_cache_mode_names() -> None:
    assert len(CACHE_MODE_NAMES) == 1 + 7 * 7
    m = cache_mode("K4V6")
    assert (m.name, m.k_bits, m.v_bits) == ("k4v6", 4, 6)
    assert m.bytes_per_token_layer(1024) == 1024 * 11 // 8
    assert cache_mode("fp16").bytes_per_token_layer(1024) == 4096
    for bad in ("q4", "k1v4", "k4v9", "k4", "fp8"):
        with pytest.raises(BadOptionError, match="k<bits>v<bits>"):
            cache_mode(bad)
    with pytest.raises(BadOptionError, match="k4v4"):
        cache_mode("q4")


def test_settings_need_whole_pages() -> None:
    with pytest.raises(BadOptionError, match="multiple of 256"):
        Exl3Settings(max_num_tokens=1000)
    assert Exl3Settings(max_num_tokens=1024).max_num_tokens == 1024


def test_unsupported_architectures_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3NextForCausalLM"):
        check_architecture("Qwen3NextForCausalLM")
    with pytest.raises(UnsupportedArchitectureError, match="YiForCausalLM"):
        synthesize(tiny_config("YiForCausalLM"), bits=4.0, head_bits=6)


def test_tensor_parallel_is_refused_by_name() -> None:
    with pytest.raises(BadOptionError, match="tensor parallel"):
        refuse_tensor_parallel()


def test_allocation_hits_the_target_from_below() -> None:
    numels = [4096 * 4096] * 4 + [4096 * 14336] * 3
    for target in (2.25, 3.5, 4.0, 5.75):
        ks = allocate_bits(numels, target)
        mean = sum(n * k for n, k in zip(numels, ks, strict=True)) / sum(numels)
        assert mean <= target and target - mean < 1.0
        assert set(ks) <= {int(target), int(target) + 1}


def test_local_dir_is_exl3_and_counts_only_model_shards(tmp_path: Path) -> None:
    d = _dir(tmp_path / "m", tiny_config())
    write_header_only(d / "hidden_states.safetensors", {"x": ("F16", (4096, 4096))})
    write_header_only(d / "cal_data.safetensors", {"y": ("F16", (64,))})
    (v,) = discover_local(d)
    assert v.format == "exl3" and v.label == "4.0bpw-h6" and v.head_bits == 6
    assert v.location.files == ("model.safetensors",)


def test_single_gpu_parts_add_up(llama8b: Variant) -> None:
    rt = RuntimeOptions(chunk_len=2048)
    v = place_config(llama8b, max_seq_len=8192, cache="k4v4", split=Split(), runtime=rt,
                     budget_per_device=(24 * GIB,), overhead_per_device=(400 * MIB,))
    (d,) = v.devices
    mb = modules_of(llama8b)
    assert d.weights == sum(b for _, b in mb.modules)
    assert d.cache == 32 * 8192 * 1024 * 9 // 8  # 288 MiB
    assert d.cache_staging == 0 and d.rope == 0
    assert d.total == d.overhead + d.weights + d.cache + d.transient
    assert v.fits and v.extras["system_ram"] == 128256 * 4096 * 2


def test_a_context_off_the_page_grid_is_unplaced_not_an_error(llama8b: Variant) -> None:
    v = place_config(llama8b, max_seq_len=1000, cache="fp16", split=Split(), runtime=RuntimeOptions(),
                     budget_per_device=(24 * GIB,), overhead_per_device=(400 * MIB,))
    assert not v.placed and not v.fits and "256-token pages" in v.reason
    # like every format's "cannot load" verdict, each device still shows the overhead it would carry
    assert [(d.budget, d.overhead) for d in v.devices] == [(24 * GIB, 400 * MIB)]


def test_autosplit_is_greedy_and_keeps_the_reserve(llama8b: Variant) -> None:
    rt = RuntimeOptions(chunk_len=2048)
    budgets = (4 * GIB, 4 * GIB)
    v = place_config(llama8b, max_seq_len=8192, cache="fp16", split=Split(mode="auto", n_devices=2), runtime=rt,
                     budget_per_device=budgets, overhead_per_device=(400 * MIB,))
    assert v.placed
    d0, d1 = v.devices
    assert d0.n_modules > 0 and d1.n_modules > 0
    assert d0.n_modules + d1.n_modules == 32 + 2
    assert d0.n_kv_layers + d1.n_kv_layers == 32
    plan = variant_plan(llama8b, max_seq_len=8192, cache="fp16", runtime=rt)
    test_t = max(m.test_transient_bytes for m in plan.modules[:d0.n_modules])
    # device 0 is filled until the next block would break free - reserve (0.5 GiB)
    assert d0.weights + d0.cache + test_t <= budgets[0] - 400 * MIB - DEFAULT_RESERVE_BYTES
    nxt = plan.modules[d0.n_modules]
    assert (d0.weights + d0.cache + nxt.weight_bytes + plan.cache_layer_bytes * nxt.kv_layer
            + max(test_t, nxt.test_transient_bytes) > budgets[0] - 400 * MIB - DEFAULT_RESERVE_BYTES)
    small = place_config(llama8b, max_seq_len=8192, cache="fp16", split=Split(mode="auto", n_devices=2), runtime=rt,
                         budget_per_device=(2 * GIB,), overhead_per_device=(400 * MIB,))
    assert not small.placed and "Insufficient VRAM in split" in small.reason


def test_manual_split_caps_each_device(llama8b: Variant) -> None:
    rt = RuntimeOptions()
    v = place_config(llama8b, max_seq_len=4096, cache="k4v4", split=Split(mode="manual", gpu_split=(2.0, 8.0)),
                     runtime=rt, budget_per_device=(12 * GIB,), overhead_per_device=(400 * MIB,))
    d0, d1 = v.devices
    assert v.placed and d1.n_modules > 0
    assert d0.weights + d0.cache <= 2 * GIB


def test_missing_head_without_tie_is_an_error(tmp_path: Path) -> None:
    cfg = {**tiny_config(), "quantization_config": quantization_config(bits=4.0, head_bits=6)}
    t = {k: v for k, v in synthesize(cfg, bits=4.0, head_bits=6).items() if not k.startswith("lm_head")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    write_header_only(tmp_path / "model.safetensors", t)
    (v,) = discover_local(tmp_path)
    with pytest.raises(ModelConfigError, match="lm_head"):
        modules_of(v)


def test_recipes_make_the_cache_before_loading() -> None:
    def spec(cache: str, split: Split, chunk: int = 2048) -> RunSpec:
        return RunSpec(fmt="exl3", label="4.0bpw-h6", model_path="/m/x y", max_seq_len=8192, cache=cache, split=split,
                       chunk_len=chunk)

    r = recipe(spec("k4v6", Split()), tool="python").text
    assert r.index("Cache(model, max_num_tokens=8192, layer_type=CacheLayer_quant, k_bits=4, v_bits=6)") < r.index(
        'model.load(device="cuda:0")')
    assert "use_per_device=[10, 15.5]" in recipe(spec("fp16", Split(mode="manual", gpu_split=(10.0, 15.5))),
                                                  tool="python").text
    assert recipe(spec("fp16", Split(mode="auto", n_devices=2), 4096), tool="python").text.endswith(
        "model.load(max_chunk_size=4096)")
    line = recipe(spec("k4v6", Split()), tool="script").text
    assert line.startswith("CUDA_VISIBLE_DEVICES=0 ") and "-cq 4,6" in line and "'/m/x y'" in line
    assert "-chunk_size 2048" in line and "-cs 8192" in line
    assert not recipe(spec("fp16", Split()), tool="llama.cpp").supported


def test_recipes_carry_a_custom_autosplit_reserve() -> None:
    def spec(split: Split) -> RunSpec:
        return RunSpec(fmt="exl3", label="4.0bpw-h6", model_path="/m/x", max_seq_len=8192, cache="k4v4", split=split)

    default = Split(mode="auto", n_devices=2)  # exllamav3's 0.5 GiB each, as placed
    custom = Split(mode="auto", n_devices=2, reserve_bytes=(1024 * MIB, 300 * MIB))
    assert recipe(spec(default), tool="python").text.endswith("model.load()")
    line = recipe(spec(custom), tool="python").text.splitlines()[-1]
    assert line == "model.load(reserve_per_device=[1, 0.29296875])"  # GiB; 300 MiB exactly after int(x * 1024**3)
    assert int(0.29296875 * 1024**3) == 300 * MIB
    assert recipe(spec(default), tool="script").supported
    r = recipe(spec(custom), tool="script")
    assert not r.supported and "reserve" in r.notes[0]


def test_quantization_config_reader_refuses_bad_entries() -> None:
    good = {"quant_method": "exl3", "tensor_storage": {"m.q": {"stored_tensors": {
        "m.q.trellis": {"shape": [8, 8, 64], "n_bytes": 8 * 8 * 64 * 2, "dtype": "torch.int16"}}}}}
    (t,) = tensors_from_quantization_config(good)
    assert (t.dtype, t.nbytes) == ("I16", 8192)
    bad = json.loads(json.dumps(good))
    bad["tensor_storage"]["m.q"]["stored_tensors"]["m.q.trellis"]["n_bytes"] = 5
    with pytest.raises(ModelConfigError, match="n_bytes"):
        tensors_from_quantization_config(bad)
    with pytest.raises(ModelConfigError, match="quant_method"):
        tensors_from_quantization_config({"quant_method": "exl2"})


def test_plan_json_gives_per_device_parts(tmp_path: Path) -> None:
    d = _dir(tmp_path / "tiny-exl3", tiny_config(max_position_embeddings=4096))
    out = subprocess.run([sys.executable, "-m", "optimizer", "plan", "--model", str(d), "--vram", "2GB,2GB",
                          "--ctx", "1024", "--cache", "fp16,k4v6", "--json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["cache"] for r in rows] == ["fp16", "k4v6"] and {r["format"] for r in rows} == {"exl3"}
    (v,) = discover_local(d)
    weights = sum(b for _, b in modules_of(v).modules)
    for r in rows:
        devs = r["devices"]
        assert sum(x["weights"] for x in devs) == weights
        per_layer = 1024 * 2 * 64 * (4 if r["cache"] == "fp16" else 11 / 8)
        assert sum(x["cache"] for x in devs) == 2 * per_layer
        assert all(x["cache_staging"] == 0 for x in devs)
