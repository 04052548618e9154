"""Quant formats. One module per format holds its tensor naming and memory rules.

``exl2`` is ExLlamaV2's format; ``gguf`` (llama.cpp) sits beside it. Each format module exposes the
:class:`FormatRules` interface below; ``optimizer.space`` dispatches on ``Variant.format`` through
:func:`rules_for`, so adding a format is adding a module and one registry line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

from optimizer.errors import BadOptionError
from optimizer.variant import Variant
from optimizer.vram import MemoryPlan


@dataclass(frozen=True)
class RuntimeOptions:
    """Format-independent runtime settings that change memory.

    Attributes:
        batch_size: sequences per forward (cache batch size).
        chunk_len: prompt chunk length in tokens (ExLlamaV2 ``max_input_len``, llama.cpp ``n_batch``).
        flash_attn: flash-attention available (changes attention transients / allowed caches).
        n_gpu_layers: llama.cpp layers offloaded to the GPU, output layer first (None = all);
            ignored by exl2.
    """

    batch_size: int = 1
    chunk_len: int = 2048
    flash_attn: bool = False
    n_gpu_layers: int | None = None


class FormatRules(Protocol):
    """What every format module provides."""

    FORMAT: str
    CACHE_MODE_NAMES: tuple[str, ...]
    DEFAULT_OVERHEAD_BYTES: int

    def default_context(self, variant: Variant) -> int:
        """The context the engine allocates when not told otherwise (tokens)."""
        ...

    def variant_plan(self, variant: Variant, *, max_seq_len: int, cache: str, runtime: RuntimeOptions) -> MemoryPlan:
        """The variant loaded with this context and cache, as bytes per module."""
        ...

    def context_step(self) -> int:
        """Granularity of usable context lengths (tokens)."""
        ...

    # Optional: ``place_config(variant, *, max_seq_len, cache, split, runtime, budget_per_device,
    # overhead_per_device) -> VramVerdict``; when present ``optimizer.space.evaluate`` uses it instead
    # of ``optimizer.vram.place`` (gguf: llama.cpp's layer split and partial offload).


_REGISTRY: dict[str, str] = {
    "exl2": "optimizer.formats.exl2_rules",
    "gguf": "optimizer.formats.gguf_rules",
    "exl3": "optimizer.formats.exl3_rules",
}


def default_cache_modes(rules: FormatRules) -> tuple[str, ...]:
    """The cache modes tried when none are named: ``DEFAULT_CACHE_MODES`` if the format has a
    shorter default list than every valid name (EXL3 has 50 K/V bit pairs), else all of them."""
    modes: tuple[str, ...] = getattr(rules, "DEFAULT_CACHE_MODES", rules.CACHE_MODE_NAMES)
    return modes


def rules_for(fmt: str) -> FormatRules:
    """The rules module of a format (imported on first use)."""
    try:
        mod = _REGISTRY[fmt]
    except KeyError:
        raise BadOptionError(f"unknown format {fmt!r}") from None
    return importlib.import_module(mod)  # type: ignore[return-value]
