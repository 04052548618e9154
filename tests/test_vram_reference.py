"""The fast, columnar VRAM model gives the same verdicts as the straightforward reference rules.

``tests/vram_reference.py`` keeps the VRAM model in its old, module-by-module form. Over a broad
generated grid (architectures, layer counts, uneven per-layer weights, contexts, cache modes,
batch and chunk sizes, flash-attn on/off, single GPU, autosplit with reserves and manual splits at
budgets around the model's size) every verdict, device by device, must be identical.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
import vram_reference as ref
from exl2_fixtures import synth_tensors
from oracle_util import tiny_config

from optimizer.arch import parse_arch
from optimizer.errors import ModelConfigError
from optimizer.formats.exl2 import Exl2Settings, memory_plan
from optimizer.formats.exl2_modules import group_modules as grouping
from optimizer.variant import TensorInfo
from optimizer.vram import GIB, MIB, MemoryPlan, ModuleCost, Split, VramVerdict, place

ARCHS = ["LlamaForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM",
         "CohereForCausalLM", "Phi3ForCausalLM", "Qwen3MoeForCausalLM"]
CACHES = ["fp16", "fp8", "q8", "q6", "q4"]


def _model(rng: random.Random) -> tuple[dict[str, Any], list[TensorInfo]]:
    arch = rng.choice(ARCHS)
    kv = rng.choice([1, 2, 4])
    cfg = tiny_config(arch, num_hidden_layers=rng.randint(1, 40), hidden_size=128 * rng.randint(1, 8),
                      num_key_value_heads=kv, num_attention_heads=kv * rng.choice([1, 2, 4]),
                      intermediate_size=256 * rng.randint(1, 8), vocab_size=rng.choice([1000, 32000, 128256]))
    tensors = synth_tensors(cfg, bits=rng.choice([2.5, 4.0, 6.0]))
    # exl2 spends bits unevenly over layers: scale each layer's tensors by its own factor.
    scale = [rng.uniform(0.5, 2.0) for _ in range(cfg["num_hidden_layers"])]
    out = []
    for t in tensors:
        parts = t.name.split(".")
        if "layers" in parts:
            f = scale[int(parts[parts.index("layers") + 1])]
            t = dataclasses.replace(t, nbytes=int(t.nbytes * f))
        out.append(t)
    return cfg, out


def _splits(rng: random.Random, weights: int, fixed: int) -> list[Split]:
    """Single, autosplit (default and random reserves) and manual splits sized around ``weights``."""
    out = [Split()]
    for n in (2, 3, 4):
        reserve = tuple(rng.choice([0, 64 * MIB, 192 * MIB, rng.randint(0, GIB)]) for _ in range(n))
        out.append(Split(mode="auto", n_devices=n))
        out.append(Split(mode="auto", n_devices=n, reserve_bytes=reserve))
        out.append(Split(mode="manual", gpu_split=tuple(round((fixed + weights / n * rng.uniform(0.5, 1.6)) / GIB, 3)
                                                        for _ in range(n))))
    return out


def _same(new: VramVerdict, old: VramVerdict) -> None:
    assert new.devices == old.devices
    assert (new.placed, new.reason, new.fits) == (old.placed, old.reason, old.fits)


@pytest.mark.parametrize("seed", range(8))
def test_exl2_verdicts_equal_reference_over_generated_grid(seed: int) -> None:
    rng = random.Random(seed)
    checked = 0
    for _ in range(40):
        cfg, tensors = _model(rng)
        arch = parse_arch(cfg)
        s = Exl2Settings(max_seq_len=rng.choice([1, 255, 2048, 4096, rng.randint(1, 200_000)]),
                         cache=rng.choice(CACHES), batch_size=rng.choice([1, 1, 2, 4]),
                         max_input_len=rng.choice([256, 512, 2048]), flash_attn=rng.random() < 0.5)
        new, old = memory_plan(arch=arch, tensors=tensors, settings=s), ref.memory_plan(arch=arch, tensors=tensors, settings=s)
        assert new.modules == old.modules
        assert (new.cache_layer_bytes, new.cache_staging_bytes, new.rope_bytes, new.plan_constant_bytes) == (
            old.cache_layer_bytes, old.cache_staging_bytes, old.rope_bytes, old.plan_constant_bytes)
        one = place(plan=new, split=Split(), budgets=(2**50,), overhead_bytes=(0,)).devices[0]
        weights = sum(m.weight_bytes for m in old.modules)
        plan_fixed = max(m.plan_bytes + m.plan_attn_bytes for m in old.modules) + old.plan_constant_bytes
        for split in _splits(rng, weights, plan_fixed):
            n = split.n_devices
            for _ in range(3):
                overhead = rng.choice([0, 400 * MIB])
                # every used device pays its fixed part; the rest is shared out unevenly
                fixed = overhead + one.scratch + one.rope + one.transient + max(split.reserve_bytes, default=0) + 256 * MIB
                budgets = tuple(fixed + int((one.total - one.scratch - one.rope) / n * rng.uniform(0.1, 1.4))
                                for _ in range(n))
                overheads = (overhead,)
                margins = (rng.choice([0, 256 * MIB, rng.randint(0, GIB)]),)
                _same(place(plan=new, split=split, budgets=budgets, overhead_bytes=overheads, margin_bytes=margins),
                      ref.place(plan=old, split=split, budgets=budgets, overhead_bytes=overheads, margin_bytes=margins))
                checked += 1
    assert checked == 40 * 10 * 3


def _rows(rng: random.Random) -> tuple[ModuleCost, ...]:
    """Arbitrary rows (as another format would build them): few distinct costs, uneven weights."""
    kinds = [dict(scratch_bytes=rng.randint(0, GIB), transient_bytes=rng.randint(0, GIB),
                  kv_layer=rng.random() < 0.5, plan_bytes=rng.randint(0, GIB), plan_attn_bytes=rng.randint(0, GIB),
                  load_transient_bytes=rng.choice([None, rng.randint(0, GIB)])) for _ in range(rng.randint(1, 5))]
    return tuple(ModuleCost(f"m{i}", rng.randint(0, 2 * GIB), **rng.choice(kinds)) for i in range(rng.randint(0, 60)))


@pytest.mark.parametrize("seed", range(4))
def test_row_built_plans_place_like_reference(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(150):
        rows = _rows(rng)
        ints = dict(cache_layer_bytes=rng.randint(0, GIB), cache_staging_bytes=rng.randint(0, GIB),
                    rope_bytes=rng.randint(0, 64 * MIB), plan_constant_bytes=rng.randint(0, 256 * MIB))
        new, old = MemoryPlan(modules=rows, **ints), ref.RefPlan(modules=rows, **ints)
        assert new.modules == rows
        weights = sum(m.weight_bytes for m in rows)
        for split in _splits(rng, weights, rng.randint(0, 2 * GIB)):
            budgets = tuple(int((weights + 4 * GIB) / split.n_devices * rng.uniform(0.2, 2.0)) + 1
                            for _ in range(split.n_devices))
            _same(place(plan=new, split=split, budgets=budgets, overhead_bytes=(100 * MIB,)),
                  ref.place(plan=old, split=split, budgets=budgets, overhead_bytes=(100 * MIB,)))


_PIECES = ["model.layers.{i}.self_attn.q_proj.q_weight", "model.layers.{i}.input_layernorm.weight",
           "model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.mlp.down_proj.q_weight",
           "model.layers.{i}.ln1.bias", "model.layers.{i}.input_layernorm.bias", "model.layers.{i}.mlp.norm.bias",
           "model.layers.{i}.ln1.weight", "model.layers.{i}.block_sparse_moe.gate.weight",
           "model.layers.{i}.", "model.layers.x{i}.mlp.up_proj.q_weight", "model.layers.{i}.q_norm.weight",
           "model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight", "lm_head.q_scale",
           "vision_tower.blocks.{i}.attn.weight", "multi_modal_projector.norm.weight", "model.layers.{i}norm.weight"]


@pytest.mark.parametrize("arch_name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "CohereForCausalLM", "gemma3"])
def test_grouping_equals_reference_on_odd_names(arch_name: str) -> None:
    from oracle_util import tiny_gemma3_config

    cfg = tiny_gemma3_config() if arch_name == "gemma3" else tiny_config(arch_name, num_hidden_layers=3)
    arch = parse_arch(cfg)
    prefixes = ["", arch.spec.lm_prefix, "language_model."]
    rng = random.Random(arch_name)
    for _ in range(200):
        tensors = [TensorInfo(name=rng.choice(prefixes) + rng.choice(_PIECES).format(i=rng.randint(0, 2)),
                              dtype="U8", shape=(1,), nbytes=rng.randint(0, 10**6)) for _ in range(rng.randint(0, 40))]
        assert _outcome(grouping, arch, tensors) == _outcome(ref.group_modules, arch, tensors)


def _outcome(fn: Any, *args: Any) -> Any:
    """The result in order, or the error's type and message."""
    try:
        return list(fn(*args).items())
    except ModelConfigError as e:
        return type(e), str(e)
