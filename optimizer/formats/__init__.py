"""Quant formats: the one registry that says what a format is, and the memory-rules interface.

A format is registered once, in :data:`FORMATS`, as a :class:`FormatSpec`: how its variants are found
on disk and on the Hub (a folder with ``config.json`` and shards named by a pattern, or ``.gguf``
files), the ``quantization_config.quant_method`` it declares, its memory-rules module (the
:class:`FormatRules` interface below, looked up with :func:`rules_for`), its run-recipe module
(``optimizer.recipes``) and its measurement backend (``optimizer.backends``). Discovery, tables, the
CLI, recipes and backends ask this registry instead of testing format names; adding a format is its
own modules plus one entry here.

``exl2`` is ExLlamaV2's format, ``exl3`` ExLlamaV3's, ``gguf`` llama.cpp's.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

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
    # Optional: ``SPLIT_PLACED_AROUND_CACHE: bool`` (default True): whether a multi-GPU split load places its
    # layers around the cache (so the engine reloads when the cache changes); False for gguf, whose layers follow
    # ``tensor_split`` proportions whatever the cache.
    # Optional: ``LOSSLESS_CACHE: str``: the cache mode every other mode of the format is a lossy copy of, decoded
    # to it at every step (never faster at the same fill, perplexity not lower): the guided search then skips a
    # lossy-cache configuration once that mode holds as much context for the same variant and split (exl2 only;
    # exllamav3 and llama.cpp attend over quantized caches directly, which can be faster).


@dataclass(frozen=True)
class FormatSpec:
    """One quant format, registered once.

    Attributes:
        name: the format's name (``Variant.format``).
        rules: module implementing :class:`FormatRules` (memory rules, cache modes).
        recipes: module with the run recipes (``RECIPES``, ``DEFAULT``...), None when there are none.
        backend: name of the measurement backend (``optimizer.backends``), None when none exists.
        layout: ``"folder"`` (``config.json`` + safetensors shards) or ``"files"`` (one variant per quant
            file or split set, e.g. ``.gguf`` files).
        quant_method: ``config.json`` ``quantization_config.quant_method`` of a folder of this format.
        shards: regex of weight-shard file names on the Hub (converter leftovers never match).
        local_shards: regex of weight files in a local folder (the engine's own loader rule).
        legacy: a folder whose config.json has no ``quantization_config`` is of this format (exl2
            quants made before March 2024).
        engine: the engine and version the rules and recipes were checked against, for people.
    """

    name: str
    rules: str
    recipes: str | None
    backend: str | None
    layout: str
    quant_method: str | None = None
    shards: str = ""
    local_shards: str = ""
    legacy: bool = False
    engine: str = ""

    def is_shard(self, filename: str, *, local: bool = False) -> bool:
        """Whether ``filename`` (a base name) holds weights of this format."""
        if filename in LEFTOVERS:
            return False
        pattern = self.local_shards if local else self.shards
        return bool(pattern) and re.match(pattern, filename) is not None


#: Converter leftovers found in published branches; never weights.
LEFTOVERS = frozenset({"hidden_states.safetensors", "cal_data.safetensors"})

FORMATS: dict[str, FormatSpec] = {
    "exl2": FormatSpec(
        name="exl2", rules="optimizer.formats.exl2_rules", recipes="optimizer.recipes.exl2", backend="exllamav2",
        layout="folder", quant_method="exl2", shards=r"^output(-\d{5}-of-\d{5})?\.safetensors$",
        local_shards=r"^.+\.safetensors$", legacy=True, engine="ExLlamaV2 0.3.2",
    ),
    "exl3": FormatSpec(
        name="exl3", rules="optimizer.formats.exl3_rules", recipes="optimizer.recipes.exl3", backend="exllamav3",
        layout="folder", quant_method="exl3", shards=r"^model(-\d{5}-of-\d{5})?\.safetensors$",
        local_shards=r"^model(-\d{5}-of-\d{5})?\.safetensors$", engine="ExLlamaV3 1.6.5",
    ),
    "gguf": FormatSpec(
        name="gguf", rules="optimizer.formats.gguf_rules", recipes="optimizer.recipes.gguf", backend="llamacpp",
        layout="files", engine="llama.cpp (llama-cpp-python 0.3.36)",
    ),
}


def format_spec(name: str) -> FormatSpec:
    """The registered format ``name``.

    Raises:
        BadOptionError: no such format.
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise BadOptionError(f"unknown format {name!r} (choose from {', '.join(FORMATS)})") from None


def legacy_format() -> FormatSpec:
    """The folder format assumed when nothing declares one (exl2)."""
    return next(s for s in FORMATS.values() if s.legacy)


def folder_format(config: Mapping[str, Any]) -> FormatSpec:
    """The format of a folder with this ``config.json``: the one whose ``quant_method`` it declares,
    else the legacy format (exl2 quants carry no ``quantization_config`` before March 2024)."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    for spec in FORMATS.values():
        if spec.layout == "folder" and spec.quant_method is not None and spec.quant_method == method:
            return spec
    return legacy_format()


def quant_bits(config: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """``bits`` and ``head_bits`` of a registered format's ``quantization_config`` block (None if absent)."""
    qc = config.get("quantization_config")
    methods = {s.quant_method for s in FORMATS.values() if s.quant_method}
    if not isinstance(qc, Mapping) or qc.get("quant_method") not in methods:
        return None, None
    b, hb = qc.get("bits"), qc.get("head_bits")
    bits = float(b) if isinstance(b, (int, float)) and not isinstance(b, bool) and 1 <= b <= 16 else None
    head = int(hb) if isinstance(hb, (int, float)) and not isinstance(hb, bool) and 1 <= hb <= 16 else None
    return bits, head


def default_cache_modes(rules: FormatRules) -> tuple[str, ...]:
    """The cache modes tried when none are named: ``DEFAULT_CACHE_MODES`` if the format has a
    shorter default list than every valid name (EXL3 has 50 K/V bit pairs), else all of them."""
    modes: tuple[str, ...] = getattr(rules, "DEFAULT_CACHE_MODES", rules.CACHE_MODE_NAMES)
    return modes


def rules_for(fmt: str) -> FormatRules:
    """The rules module of a format (imported on first use)."""
    return importlib.import_module(format_spec(fmt).rules)  # type: ignore[return-value]
