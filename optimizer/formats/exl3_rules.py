"""The :class:`~optimizer.formats.FormatRules` of EXL3, over ``optimizer.formats.exl3``."""

from __future__ import annotations

from functools import lru_cache

from optimizer.arch import ModelArch, parse_arch
from optimizer.formats import RuntimeOptions
from optimizer.formats.exl3 import (
    ARCHITECTURES,
    CACHE_MODE_HELP,
    CACHE_MODE_NAMES,
    DEFAULT_CACHE_MODES,
    DEFAULT_OVERHEAD_BYTES,
    PAGE_SIZE,
    Exl3Settings,
    ModuleBytes,
    block_transient,
    cache_layer_bytes,
    check_architecture,
    group_modules,
    head_transient,
    mtp_layers,
)
from optimizer.formats.exl3_place import place
from optimizer.variant import Variant
from optimizer.vram import MemoryPlan, ModuleCost, Split, VramVerdict, split_budgets, unplaced

FORMAT = "exl3"
__all__ = [
    "FORMAT", "CACHE_MODE_NAMES", "CACHE_MODE_HELP", "DEFAULT_CACHE_MODES", "DEFAULT_OVERHEAD_BYTES", "arch_of",
    "default_context", "context_step", "variant_plan", "place_config", "host_bytes", "load_chunk",
]


@lru_cache(maxsize=256)
def _arch_cached(variant: Variant) -> ModelArch:
    archs = variant.config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        check_architecture(archs[0])
    return parse_arch(variant.config, architectures=ARCHITECTURES)


def arch_of(variant: Variant) -> ModelArch:
    """Parsed dimensions of an EXL3 variant (cached per variant); unsupported architectures refused."""
    return _arch_cached(variant)


@lru_cache(maxsize=256)
def modules_of(variant: Variant) -> ModuleBytes:
    """The variant's tensors grouped into exllamav3's top-level modules (computed once per variant)."""
    return group_modules(arch_of(variant), variant.tensors, extra_layers=mtp_layers(variant.config))


def default_context(variant: Variant) -> int:
    """``max_position_embeddings`` rounded down to a whole cache page (exllamav3 has no default cache size)."""
    ctx = arch_of(variant).max_seq_len
    return max(ctx - ctx % PAGE_SIZE, PAGE_SIZE)


def context_step() -> int:
    """exllamav3 caches are whole 256-token pages."""
    return PAGE_SIZE


def host_bytes(variant: Variant) -> int:
    """System RAM the loaded model keeps: the token embedding (bytes)."""
    return modules_of(variant).embedding


def variant_plan(variant: Variant, *, max_seq_len: int, cache: str, runtime: RuntimeOptions) -> MemoryPlan:
    """The variant loaded with a ``max_seq_len``-token cache of mode ``cache``, as bytes per module.

    ``transient_bytes`` is the peak of a ``chunk_len``-row forward with full logits (perplexity);
    ``load_transient_bytes`` is the autosplit measuring forward (``chunk_len`` rows, 32 at the head).
    """
    arch = arch_of(variant)
    chunk = min(runtime.chunk_len, max_seq_len)  # as the backend loads it (see load_chunk)
    s = Exl3Settings(max_num_tokens=max_seq_len, cache=cache, max_chunk_size=chunk)
    rows = chunk * runtime.batch_size
    blk = block_transient(arch, s, rows=rows)
    blk_test = block_transient(arch, s, rows=s.max_chunk_size)
    mods = []
    for key, nbytes in modules_of(variant).modules:
        if key == "lm_head":
            mods.append(ModuleCost(key, nbytes, transient_bytes=head_transient(arch, rows=rows),
                                   load_transient_bytes=head_transient(arch, rows=s.max_output_size)))
        elif key.startswith("model.layers."):
            mods.append(ModuleCost(key, nbytes, transient_bytes=blk, kv_layer=True, load_transient_bytes=blk_test))
        else:
            mods.append(ModuleCost(key, nbytes))
    return MemoryPlan(modules=tuple(mods), cache_layer_bytes=cache_layer_bytes(arch, s), cache_staging_bytes=0,
                      rope_bytes=0)


def load_chunk(*, chunk_len: int, max_seq_len: int) -> int:
    """``max_chunk_size`` for ``Model.load``: the chunk, at most the cache. The autosplit measuring
    forward runs one chunk through the cache with ``batch_shape (1, chunk)``, which exllamav3 refuses
    when it exceeds ``max_num_tokens`` ("Cache too small for batch shape")."""
    return min(chunk_len, max_seq_len)


def place_config(
    variant: Variant,
    *,
    max_seq_len: int,
    cache: str,
    split: Split,
    runtime: RuntimeOptions,
    budget_per_device: tuple[int, ...],
    overhead_per_device: tuple[int, ...],
) -> VramVerdict:
    """Per-GPU memory of an EXL3 configuration placed as ``Model.load`` places it (bytes)."""
    budgets, overheads = split_budgets(split, budget_per_device, overhead_per_device)
    if max_seq_len < PAGE_SIZE or max_seq_len % PAGE_SIZE:  # exllamav3 asserts whole pages: not loadable
        return unplaced(budgets=budgets, overheads=overheads,
                        reason=f"exllamav3 caches are whole {PAGE_SIZE}-token pages; {max_seq_len} is not a multiple")
    plan = variant_plan(variant, max_seq_len=max_seq_len, cache=cache, runtime=runtime)
    v = place(plan=plan, split=split, budgets=budgets, overheads=overheads)
    mb = modules_of(variant)
    return VramVerdict(devices=v.devices, placed=v.placed, reason=v.reason,
                       extras={"system_ram": mb.embedding, "not_loaded": mb.not_loaded})


