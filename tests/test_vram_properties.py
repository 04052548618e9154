"""Property tests (hypothesis): size parser, config parser robustness, VRAM model invariants."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from exl2_fixtures import synth_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer.arch import parse_arch
from optimizer.errors import ModelConfigError, SizeParseError
from optimizer.formats.exl2 import Exl2Settings, memory_plan
from optimizer.units import MAX_SIZE, parse_size
from optimizer.vram import MemoryPlan, Split, place

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- sizes ---------------------------------------------------------------------------------------

@given(n=st.integers(min_value=1, max_value=10**6), unit=st.sampled_from(sorted(_UNITS)))
def test_parse_size_integer_round_trip(n: int, unit: str) -> None:
    if n * _UNITS[unit] > MAX_SIZE:
        with pytest.raises(SizeParseError):
            parse_size(f"{n}{unit}")
        return
    assert parse_size(f"{n}{unit}") == n * _UNITS[unit]
    assert parse_size(f" {n} {unit.lower()} ") == n * _UNITS[unit]


@given(x=st.floats(min_value=0.01, max_value=4096, allow_nan=False), unit=st.sampled_from(["GB", "GiB", "MiB"]))
def test_parse_size_decimal_is_close(x: float, unit: str) -> None:
    text = f"{x:.2f}{unit}"
    assert abs(parse_size(text) - float(f"{x:.2f}") * _UNITS[unit]) <= 1


@given(text=st.text(max_size=20))
def test_parse_size_rejects_junk_with_typed_error(text: str) -> None:
    try:
        n = parse_size(text)
    except SizeParseError:
        return
    assert 1 <= n <= MAX_SIZE
    assert any(ch.isdigit() for ch in text)


@pytest.mark.parametrize("text", ["", "GB", "-1GB", "0GB", "1e3GB", "15 G B", "15XB", "nanGB", "2PiB", "1,5GB"])
def test_parse_size_rejects_examples(text: str) -> None:
    with pytest.raises(SizeParseError):
        parse_size(text)


# --- config parser -------------------------------------------------------------------------------

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                       st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_json = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                     max_leaves=10)
_KEYS = ["architectures", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
         "num_hidden_layers", "intermediate_size", "vocab_size", "max_position_embeddings",
         "num_local_experts", "num_experts_per_tok", "partial_rotary_factor", "text_config",
         "quantization_config", "tie_word_embeddings", "max_sequence_length"]
_archs = st.sampled_from(["LlamaForCausalLM", "MixtralForCausalLM", "Gemma3ForConditionalGeneration",
                          "FooForCausalLM", "Phi3ForCausalLM"])
_values = st.one_of(_json, st.integers(0, 70000), _archs.map(lambda a: [a]))


@given(cfg=st.dictionaries(st.sampled_from(_KEYS), _values, max_size=12))
@FAST
def test_parse_arch_raises_only_model_config_errors(cfg: dict[str, Any]) -> None:
    try:
        arch = parse_arch(cfg)
    except ModelConfigError:
        return
    assert arch.hidden_size >= 1 and arch.head_dim >= 1 and arch.num_key_value_heads >= 1
    assert arch.num_attention_heads % arch.num_key_value_heads == 0


@given(cfg=_json)
def test_parse_arch_rejects_non_configs(cfg: Any) -> None:
    # Anything but a ModelConfigError (TypeError, KeyError, ...) fails the test.
    with contextlib.suppress(ModelConfigError):
        parse_arch(cfg)


# --- VRAM invariants -----------------------------------------------------------------------------

def _cfg(layers: int, hidden_mult: int, heads: int, kv_div: int, vocab: int, moe: bool) -> dict[str, Any]:
    kv = max(heads // kv_div, 1)
    heads = kv * kv_div
    cfg: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if moe else "LlamaForCausalLM"],
        "hidden_size": 64 * hidden_mult, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": 64, "num_hidden_layers": layers, "intermediate_size": 128 * hidden_mult,
        "vocab_size": vocab, "max_position_embeddings": 4096,
    }
    if moe:
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    return cfg


_configs = st.builds(_cfg, layers=st.integers(1, 6), hidden_mult=st.integers(1, 8), heads=st.integers(1, 16),
                     kv_div=st.sampled_from([1, 2, 4]), vocab=st.integers(100, 5000), moe=st.booleans())




def _plan(cfg: dict[str, Any], *, ctx: int, cache: str = "fp16", bits: float = 4.0) -> MemoryPlan:
    return memory_plan(arch=parse_arch(cfg), tensors=synth_tensors(cfg, bits=bits), settings=Exl2Settings(max_seq_len=ctx, cache=cache))


def _total(plan: MemoryPlan, n_gpus: int = 1) -> int:
    split = Split() if n_gpus == 1 else Split(mode="auto", n_devices=n_gpus)
    return place(plan=plan, split=split, budgets=(2**50,), overhead_bytes=(0,)).total


@given(cfg=_configs, ctx=st.integers(1, 20000), extra=st.integers(1, 20000),
       cache=st.sampled_from(["fp16", "fp8", "q8", "q6", "q4"]))
@FAST
def test_more_context_never_needs_less(cfg: dict[str, Any], ctx: int, extra: int, cache: str) -> None:
    assert _total(_plan(cfg, ctx=ctx + extra, cache=cache)) >= _total(_plan(cfg, ctx=ctx, cache=cache))


@given(cfg=_configs, bits=st.floats(2.0, 7.5), more=st.floats(0.05, 2.0))
@FAST
def test_more_bits_never_needs_less(cfg: dict[str, Any], bits: float, more: float) -> None:
    hi = min(bits + more, 8.0)
    lo_plan, hi_plan = _plan(cfg, ctx=1024, bits=bits), _plan(cfg, ctx=1024, bits=hi)
    assert sum(m.weight_bytes for m in hi_plan.modules) >= sum(m.weight_bytes for m in lo_plan.modules)
    assert _total(hi_plan) >= _total(lo_plan)


@given(cfg=_configs, ctx=st.integers(1, 50000))
@FAST
def test_wider_cache_never_needs_less(cfg: dict[str, Any], ctx: int) -> None:
    def cache_total(mode: str) -> int:
        p = _plan(cfg, ctx=ctx, cache=mode)
        n_kv = sum(m.kv_layer for m in p.modules)
        return n_kv * p.cache_layer_bytes + p.cache_staging_bytes

    q4, q6, q8, fp8, fp16 = (cache_total(m) for m in ("q4", "q6", "q8", "fp8", "fp16"))
    assert q4 <= q6 <= q8
    assert fp8 <= q8  # FP8 has no scales, so it is smaller than Q8 (not between Q8 and FP16 in order)
    # A quantized cache adds one full-length FP16 K+V staging pair per device, so per element
    # Q8 = 2.125 NL + 4 bytes against FP16 = 4 NL: Q8 is smaller only from three layers on.
    if cfg["num_hidden_layers"] >= 3:
        assert q8 <= fp16
    for mode in ("q4", "q6", "q8", "fp8", "fp16"):
        assert _total(_plan(cfg, ctx=ctx, cache=mode)) >= 0


@given(cfg=_configs, ctx=st.integers(256, 30000), n_gpus=st.integers(1, 4), budget_gib=st.floats(0.05, 4.0))
@FAST
def test_parts_add_up_and_autosplit_places_every_module(cfg: dict[str, Any], ctx: int, n_gpus: int,
                                                        budget_gib: float) -> None:
    plan = _plan(cfg, ctx=ctx, cache="q4")
    budget = int(budget_gib * 2**30)
    for split in (Split(), Split(mode="auto", n_devices=n_gpus)):
        v = place(plan=plan, split=split, budgets=(budget,), overhead_bytes=(64 * 2**20,))
        for d in v.devices:
            assert d.total == (d.overhead + d.weights + d.cache + d.cache_staging + d.scratch + d.rope
                               + d.transient)
            assert d.headroom == d.budget - d.total
        assert v.total == sum(d.total for d in v.devices)
        if v.placed:
            assert sum(d.n_modules for d in v.devices) == len(plan.modules)
            assert sum(d.weights for d in v.devices) == sum(m.weight_bytes for m in plan.modules)
            assert sum(d.n_kv_layers for d in v.devices) == sum(m.kv_layer for m in plan.modules)
            assert sum(d.cache for d in v.devices) == plan.cache_layer_bytes * sum(m.kv_layer for m in plan.modules)
    # With room to spare, autosplit over N GPUs always places every module.
    big = place(plan=plan, split=Split(mode="auto", n_devices=n_gpus), budgets=(2**45,), overhead_bytes=(0,))
    assert big.placed and sum(d.n_modules for d in big.devices) == len(plan.modules)
