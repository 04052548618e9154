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
from optimizer.formats.gguf import GgufModel, LlamaSettings, memory_plan, model_from_config
from optimizer.variant import Variant
from optimizer.vram import MIB, MemoryPlan

FORMAT = "gguf"
#: KV types offered by default (symmetric) plus the usual mixed pairs.
CACHE_MODE_NAMES: tuple[str, ...] = ("f16", "q8_0", "q4_0", "q8_0/q4_0", "q8_0/f16", "q4_0/f16")
#: Per-GPU memory llama.cpp does not log (CUDA context, cuBLAS workspace, pool): ~450-750 MiB seen.
DEFAULT_OVERHEAD_BYTES = 512 * MIB
#: n_ubatch llama-cpp-python uses (its default); also the compute-buffer ubatch of the rules.
DEFAULT_UBATCH = 512
__all__ = ["FORMAT", "CACHE_MODE_NAMES", "DEFAULT_OVERHEAD_BYTES", "model_of", "default_context",
           "variant_plan", "context_step", "kv_types", "settings_for"]


@lru_cache(maxsize=256)
def _model_cached(variant: Variant) -> GgufModel:
    return model_from_config(variant.config, variant.tensors)


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
