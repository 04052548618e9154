"""The :class:`~optimizer.formats.FormatRules` of GGUF (llama.cpp), over ``optimizer.formats.gguf``.

Cache modes name the KV-cache ggml types: ``f16``, ``q8_0``, ``q4_0`` (K and V alike) or a
``K/V`` pair such as ``q8_0/q4_0``. A quantized V cache needs flash attention in llama.cpp, so
the rules (and the llama.cpp backend) turn flash attention on for those modes, as llama.cpp's own
``flash_attn=auto`` does.

Budget semantics: the plan is what llama.cpp puts on the *device* for ``runtime.n_gpu_layers``
(None = everything offloadable): offloaded layer weights (+ the output layer, + the tied
``token_embd`` copy), their KV cache and the compute buffer. ``token_embd`` itself and the output
buffer stay in host memory on a real GPU and are not charged. On a CPU-only machine the same
"all layers offloaded" prediction is used as the budgeted figure.
"""

from __future__ import annotations

from functools import lru_cache

from optimizer.errors import BadOptionError
from optimizer.formats import RuntimeOptions
from optimizer.formats.gguf import (
    GGML_TYPE_IDS,
    GGML_TYPES,
    GgufModel,
    LlamaSettings,
    check_settings,
    memory_plan,
    model_from_config,
    predict_devices,
    split_layers,
)
from optimizer.variant import Variant
from optimizer.vram import GIB, MIB, DeviceBreakdown, MemoryPlan, Split, VramVerdict, split_budgets, unplaced

FORMAT = "gguf"
#: KV types offered by default (symmetric) plus the usual mixed pairs.
CACHE_MODE_NAMES: tuple[str, ...] = ("f16", "q8_0", "q4_0", "q8_0/q4_0", "q8_0/f16", "q4_0/f16")
#: Per-GPU memory llama.cpp does not log (CUDA context, cuBLAS workspace, pool): ~450-750 MiB seen.
DEFAULT_OVERHEAD_BYTES = 512 * MIB
#: n_ubatch llama-cpp-python uses (its default); also the compute-buffer ubatch of the rules.
DEFAULT_UBATCH = 512
#: llama.cpp spreads layers by ``tensor_split`` proportions, not around the KV cache: a split keeps its model
#: across contexts and caches (``optimizer.backends.llamacpp`` reloads per variant and split only).
SPLIT_PLACED_AROUND_CACHE = False
__all__ = ["FORMAT", "CACHE_MODE_NAMES", "DEFAULT_OVERHEAD_BYTES", "SPLIT_PLACED_AROUND_CACHE", "model_of", "default_context",
           "variant_plan", "context_step", "kv_types", "settings_for", "place_config", "tensor_split_of", "kv_type_problem"]


@lru_cache(maxsize=256)
def _model_cached(variant: Variant) -> GgufModel:
    from optimizer.textsafe import safe

    return model_from_config(variant.config, variant.tensors, where=safe(variant.source))


def model_of(variant: Variant) -> GgufModel:
    """llama.cpp hparams and per-layer bytes of a GGUF variant (cached per variant)."""
    return _model_cached(variant)


def kv_types(cache: str) -> tuple[str, str]:
    """``"q8_0/q4_0"`` -> ``("q8_0", "q4_0")``; ``"q8_0"`` -> ``("q8_0", "q8_0")``."""
    name = cache.lower()
    if name not in CACHE_MODE_NAMES:
        raise BadOptionError(f"unknown cache mode {cache!r} for gguf (choose from {', '.join(CACHE_MODE_NAMES)})")
    k, _, v = name.partition("/")
    return k, v or k


def default_context(variant: Variant) -> int:
    """``{arch}.context_length`` (what llama.cpp allocates for ``n_ctx=0``)."""
    return model_of(variant).n_ctx_train


def context_step() -> int:
    """llama.cpp pads every context to a multiple of 256 cells."""
    return 256


def settings_for(*, max_seq_len: int, cache: str, runtime: RuntimeOptions) -> LlamaSettings:
    """The llama-cpp-python settings the backend uses for a configuration (flash attention on when
    asked or when V is quantized; ``n_batch`` = ``runtime.chunk_len``, ``n_ubatch`` 512)."""
    tk, tv = kv_types(cache)
    fa = runtime.flash_attn or tv not in ("f16", "f32", "bf16")
    return LlamaSettings(n_ctx=max_seq_len, type_k=tk, type_v=tv, flash_attn=fa, n_batch=runtime.chunk_len,
                         n_ubatch=DEFAULT_UBATCH, n_seq=runtime.batch_size, n_gpu_layers=runtime.n_gpu_layers)


def variant_plan(variant: Variant, *, max_seq_len: int, cache: str, runtime: RuntimeOptions) -> MemoryPlan:
    plan: MemoryPlan = memory_plan(model_of(variant), settings_for(max_seq_len=max_seq_len, cache=cache, runtime=runtime))
    return plan


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
    """Per-GPU memory of a GGUF configuration as llama.cpp places it (LAYER split), in bytes.

    ``split`` means, for llama.cpp:

    * ``single``: one GPU (``split_mode=NONE``, ``main_gpu=0``);
    * ``auto`` with ``n_devices = N``: an even ``tensor_split`` over N GPUs (``[1] * N``);
    * ``manual``: ``gpu_split`` is the ``tensor_split`` *proportions* (``10,15`` puts 40 % of the
      offloaded layers on GPU 0 and 60 % on GPU 1), not GiB as for exl2.

    ``runtime.n_gpu_layers`` (None = all) offloads the output layer first, then the last ``k - 1``
    repeating layers (:func:`optimizer.formats.gguf.predict_devices`). Every device of the split is
    charged ``overhead_per_device`` (its CUDA context); weights, KV cache (``cache``) and the compute
    buffer (``transient``) are ``predict_devices``'s numbers. A KV type llama.cpp refuses for this
    model (e.g. a quantized type whose block size does not divide the head dimension) gives an
    unplaced verdict with the reason instead of an error.
    """
    budgets, overheads = split_budgets(split, budget_per_device, overhead_per_device)
    m = model_of(variant)
    s = settings_for(max_seq_len=max_seq_len, cache=cache, runtime=runtime)
    problem = kv_type_problem(m, s)
    if problem:
        return unplaced(budgets=budgets, overheads=overheads, reason=problem)
    preds = predict_devices(m, s, tensor_split=tensor_split_of(split))
    where = split_layers(m, n_gpu_layers=s.n_gpu_layers, tensor_split=tensor_split_of(split))
    devs = tuple(
        DeviceBreakdown(
            index=i, budget=budgets[i], overhead=overheads[i], weights=p.weights, cache=p.kv, transient=p.compute,
            n_modules=sum(1 for d in where.values() if d == i),
            n_kv_layers=sum(1 for il, d in where.items() if d == i and il < m.n_layer),
        )
        for i, p in enumerate(preds)
    )
    over = [d for d in devs if not d.fits]
    reason = f"GPU {over[0].index} needs {over[0].total / GIB:.2f} GiB of {over[0].budget / GIB:.2f} GiB" if over else ""
    return VramVerdict(devices=devs, placed=True, reason=reason)


def tensor_split_of(split: Split) -> tuple[float, ...]:
    """llama.cpp ``tensor_split`` proportions of a :class:`~optimizer.vram.Split` (see :func:`place_config`)."""
    if split.mode == "single":
        return (1.0,)
    if split.mode == "manual":
        return tuple(float(g) for g in split.gpu_split)
    return (1.0,) * max(split.n_devices, 1)



def kv_type_problem(m: GgufModel, s: LlamaSettings) -> str:
    """Why llama.cpp refuses these KV types for this model, or ``""``: a quantized V cache without
    flash attention, a block size that does not divide the head dimension (flash attention) or a
    layer's K/V row (``n_head_kv * head_dim`` elements)."""
    try:
        check_settings(s, m)
    except BadOptionError as e:
        return str(e)
    for t, dim in ((s.type_k, m.head_dim_k), (s.type_v, m.head_dim_v)):
        block = GGML_TYPES[GGML_TYPE_IDS[t.lower()]][1]
        for hkv in set(m.n_head_kv):
            if (hkv * dim) % block:
                return (f"KV cache type {t} needs rows that are a multiple of {block} elements "
                        f"(this model has {hkv} KV heads x {dim})")
    return ""
