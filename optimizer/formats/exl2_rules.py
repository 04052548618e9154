"""The :class:`~optimizer.formats.FormatRules` of exl2, over ``optimizer.formats.exl2``."""

from __future__ import annotations

from functools import lru_cache

from optimizer.arch import ModelArch, parse_arch
from optimizer.formats import RuntimeOptions
from optimizer.formats.accounting import check_exl2
from optimizer.formats.exl2 import CACHE_MODES, DEFAULT_OVERHEAD_BYTES, Exl2Settings, table_plan
from optimizer.formats.exl2_modules import group_modules, table_of
from optimizer.textsafe import safe
from optimizer.variant import TensorInfo, Variant
from optimizer.vram import MemoryPlan, ModuleTable

FORMAT = "exl2"
CACHE_MODE_NAMES: tuple[str, ...] = tuple(CACHE_MODES)
#: The cache mode every other one is a lossy copy of: exllamav2 0.3.2 decodes an FP8 (``cache.py``
#: ``ExLlamaV2Cache_8bit.get_kv_state``, ``fp8_to_fp16``) or Q4/Q6/Q8 cache (``ExLlamaV2Cache_Q.get_kv_state``,
#: ``q_to_fp16_kv``) into FP16 staging tensors at every forward and attends over those. At the same fill such a
#: cache therefore does more work per token than FP16 (never faster) and holds a quantized copy of the same keys and
#: values (perplexity not lower, beyond noise): it is worth having only for the context it adds.
LOSSLESS_CACHE = "fp16"
__all__ = ["FORMAT", "CACHE_MODE_NAMES", "DEFAULT_OVERHEAD_BYTES", "LOSSLESS_CACHE", "arch_of", "default_context",
           "variant_plan", "context_step"]


@lru_cache(maxsize=256)
def _arch_cached(variant: Variant) -> ModelArch:
    return parse_arch(variant.config)


def arch_of(variant: Variant) -> ModelArch:
    """Parsed dimensions of an exl2 variant (cached per variant)."""
    return _arch_cached(variant)


def default_context(variant: Variant) -> int:
    """``config.max_seq_len`` as ExLlamaV2 reads it (usually ``max_position_embeddings``)."""
    return arch_of(variant).max_seq_len


def context_step() -> int:
    """ExLlamaV2's dynamic generator needs cache lengths that are multiples of 256."""
    return 256


@lru_cache(maxsize=256)
def _table(variant: Variant) -> ModuleTable:
    """The variant's modules with their weights, grouped once per variant (thousands of tensors).
    Weights the rules would leave out are refused first (``optimizer.formats.accounting``)."""
    arch = arch_of(variant)
    dropped: list[TensorInfo] = []
    groups = group_modules(arch, variant.tensors, dropped=dropped)
    check_exl2(arch, variant.tensors, where=safe(variant.source), grouped=(groups, dropped))
    return table_of(groups)


@lru_cache(maxsize=8192)
def _plan(variant: Variant, max_seq_len: int, cache: str, runtime: RuntimeOptions) -> MemoryPlan:
    settings = Exl2Settings(
        max_seq_len=max_seq_len,
        cache=cache,
        batch_size=runtime.batch_size,
        max_input_len=runtime.chunk_len,
        flash_attn=runtime.flash_attn,
    )
    return table_plan(arch=arch_of(variant), table=_table(variant), settings=settings)


def config_problem(variant: Variant, *, max_seq_len: int, cache: str, runtime: RuntimeOptions) -> str | None:
    """Why exllamav2 0.3.2 could not run this configuration at all, or None.

    Without flash-attn (and xformers) ``ExLlamaV2.forward`` shrinks each prompt chunk so that
    ``q * (past + q) <= max_attention_size`` (model.py ~L888-895). The backend and the recipes set
    ``max_attention_size = chunk ** 2`` (as the example scripts' ``-chunk`` does), so once the past
    reaches ``chunk ** 2`` tokens the chunk rounds down to 0 and the forward never advances: the
    context must stay at or below ``chunk ** 2`` tokens.
    """
    del variant, cache
    if runtime.flash_attn:
        return None
    chunk = min(runtime.chunk_len, max_seq_len)
    if chunk * chunk < max_seq_len:
        return (f"without flash-attn exllamav2 0.3.2 stalls on prompts past {chunk * chunk} tokens with a {chunk}-token "
                f"chunk (the context must stay within chunk squared); use a larger --chunk or --flash-attn")
    return None


def variant_plan(variant: Variant, *, max_seq_len: int, cache: str, runtime: RuntimeOptions) -> MemoryPlan:
    """The variant loaded with this context, cache and runtime, as bytes per module (memoized)."""
    return _plan(variant, max_seq_len, cache, runtime)
