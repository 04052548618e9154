"""ExLlamaV2 0.3.2 (exl2) memory rules: from a variant's metadata to a :class:`~optimizer.vram.MemoryPlan`.

Every rule below is read from the exllamav2 0.3.2 sources and checked by the oracle tests
(``tests/test_oracle_exllamav2.py``) against the library's own ``weight_footprint()``,
``scratch_space_fixed()`` and cache ``footprint()``:

* Weights: the exact bytes of each stored tensor (safetensors header), grouped into the modules
  ExLlamaV2 builds (attention with its pre/post norms, MLP with its norms, final norm, ``lm_head``).
  The token embedding stays in system RAM and is excluded.
* KV cache per attention layer: K and V of shape ``(B, S, Hkv, D // w)`` bytes (``w`` elements per
  byte: 1 for FP8/Q8 and Q6 keys, 2 for Q4 and Q6 values), plus FP16 scales ``(B, S, Hkv, D // 32)``
  for Q caches. Q caches do round ``S`` up to ``q_block`` (the smallest n with ``Hkv*D*n % 512 == 0``)
  but only *after* allocating, so the rounding changes no byte. Quantized caches (FP8, Q8, Q6, Q4)
  also keep one FP16 K and V staging tensor ``(B, S, Hkv, D)`` per device that holds cache layers.
* Norms: ExLlamaV2 counts every norm module (RMSNorm, LayerNorm, per-head q/k norms) as
  ``hidden_size * 2`` bytes whatever its stored shape; the model does the same.
* Scratch: ``scratch_space_fixed()`` per module (attention, MLP, MoE MLP, ``lm_head``); the device
  allocates the maximum over its modules (manual split) or over all modules (autosplit).
* Manual-split planning (``set_device_map``): a module goes on a device while its weights plus the
  device's running maxima of ``scratch_space()`` (for attention: the fixed scratch, Q/K/V of a
  chunk and the ``repeat_kv`` copies over the whole context) and ``temp_attn_size()`` fit in the
  ``gpu_split`` allocation less a per-device constant (sin/cos, one chunk's state and mask).
  Checked module for module against the library by ``tests/test_placement_library.py``.
* RoPE: FP16 sin and cos tables of ``config.max_seq_len x rot_dim`` per device and per RoPE base.
* Transient (not checked by the oracle, a documented approximation): the residual stream and the
  query/output activations of one ``max_input_len`` chunk, the chunk's logits on the head device,
  and, without flash-attention, ``repeat_kv`` copies of K and V over the whole context plus the
  matmul attention's fp16 scores (:func:`matmul_attention_bytes`).
* Overhead: the CUDA context and allocator slack, a constant per GPU (``DEFAULT_OVERHEAD_BYTES``,
  overridable) that ExLlamaV2 itself does not model.
* Fragmentation (``optimizer.allocator``): none beyond the overhead with
  ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (what exl2opt measures with and its recipes
  set); without it, up to one device's largest transient may be stranded, not charged.

Example (Llama-3-8B shapes, FP16 cache, 8192 tokens, one GPU): cache = 32 layers x 2 x 8192 x 8 x
128 x 2 B = 1 GiB; scratch = the ``lm_head`` dequant buffer 2 x min(4096 x 128256, 512 Mi) B = 1 GiB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from optimizer.arch import ModelArch
from optimizer.errors import BadOptionError
from optimizer.formats.exl2_modules import group_modules, module_table
from optimizer.variant import TensorInfo
from optimizer.vram import MIB, MemoryPlan, ModuleKind, ModuleTable

FORMAT = "exl2"


@dataclass(frozen=True)
class CacheMode:
    """One ExLlamaV2 cache class: bits per element of K and V and whether it is quantized.

    ``q_cache`` caches (Q4/Q6/Q8) add FP16 scales per 32 elements; every ``staged`` cache keeps
    FP16 staging tensors per device.
    """

    name: str
    cls: str
    k_bits: int
    v_bits: int
    q_cache: bool
    staged: bool

    def bytes_per_token_layer(self, kv_dim: int) -> float:
        """Average bytes of K+V (+scales) per token per layer, ignoring staging and rounding."""
        scales = 2 * 2 * kv_dim / 32 if self.q_cache else 0
        return kv_dim * (self.k_bits + self.v_bits) / 8 + scales


CACHE_MODES: dict[str, CacheMode] = {
    "fp16": CacheMode("fp16", "ExLlamaV2Cache", 16, 16, q_cache=False, staged=False),
    "fp8": CacheMode("fp8", "ExLlamaV2Cache_8bit", 8, 8, q_cache=False, staged=True),
    "q8": CacheMode("q8", "ExLlamaV2Cache_Q8", 8, 8, q_cache=True, staged=True),
    "q6": CacheMode("q6", "ExLlamaV2Cache_Q6", 8, 4, q_cache=True, staged=True),
    "q4": CacheMode("q4", "ExLlamaV2Cache_Q4", 4, 4, q_cache=True, staged=True),
}

#: Q-cache block: ``Hkv * D * q_block`` must be a multiple of this (``Q_CACHE_BLOCKSIZE_Q``).
Q_CACHE_BLOCKSIZE = 512

#: ExLlamaV2Config defaults (``exllamav2/config.py``).
DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_MAX_DQ_SIZE = 512 * 1024**2  # elements

#: Device memory per GPU beyond torch's allocations (CUDA context, cuBLAS, kernel images of torch,
#: exllamav2_ext and flash-attn), bytes, for GPUs ``exl2opt calibrate`` has not measured. Published
#: readings: 300-723 MiB for a lazily-loaded CUDA context alone, 0.9-1.5 GiB per GPU at nvidia-smi
#: level beside ExLlamaV2's allocations (sources in docs/calibration.md). Not modelled by ExLlamaV2.
DEFAULT_OVERHEAD_BYTES = 1024 * MIB


def cache_mode(name: str) -> CacheMode:
    """Look up a cache mode by name (``fp16``, ``fp8``, ``q8``, ``q6``, ``q4``)."""
    try:
        return CACHE_MODES[name.lower()]
    except KeyError:
        raise BadOptionError(
            f"unknown cache mode {name!r} (choose from {', '.join(CACHE_MODES)})"
        ) from None


@dataclass(frozen=True)
class Exl2Settings:
    """Runtime settings that change memory. Validated once, at construction.

    Attributes:
        max_seq_len: cache length in tokens (``ExLlamaV2Cache(max_seq_len=...)``) and
            ``config.max_seq_len`` (RoPE tables).
        cache: cache mode name.
        batch_size: ``config.max_batch_size`` and the cache batch size.
        max_input_len: prompt chunk length (``config.max_input_len``).
        max_dq_size: ``config.max_dq_size`` in elements.
        flash_attn: whether flash-attention is used; without it SDPA copies K/V per query head.
    """

    max_seq_len: int
    cache: str = "fp16"
    batch_size: int = 1
    max_input_len: int = DEFAULT_MAX_INPUT_LEN
    max_dq_size: int = DEFAULT_MAX_DQ_SIZE
    flash_attn: bool = False

    def __post_init__(self) -> None:
        if self.max_seq_len < 1:
            raise BadOptionError(f"context length must be positive, got {self.max_seq_len}")
        if self.batch_size < 1 or self.max_input_len < 1:
            raise BadOptionError("batch size and chunk length must be positive")
        cache_mode(self.cache)

    @property
    def chunk_len(self) -> int:
        """ExLlamaV2 clamps ``max_input_len`` to ``max_seq_len``."""
        return min(self.max_input_len, self.max_seq_len)


def _pad32(n: int) -> int:
    return n + (-n % 32)


def _dq(in_f: int, out_f: int, s: Exl2Settings) -> int:
    """``ExLlamaV2Linear.temp_dq_size()``: 2 bytes x min(in x padded out, max_dq_size)."""
    return 2 * min(in_f * _pad32(out_f), s.max_dq_size)


def attn_scratch(arch: ModelArch, s: Exl2Settings) -> int:
    """``ExLlamaV2Attention.scratch_space_fixed()`` in bytes."""
    rows = s.chunk_len * s.batch_size
    h, q, kv = arch.hidden_size, arch.num_attention_heads * arch.head_dim, arch.kv_dim
    temp_state = rows * max(q, h) * 2 + 128
    temp_dq = max(_dq(h, q, s), _dq(h, kv, s), _dq(q, h, s))
    return temp_state + temp_dq


def attn_plan_scratch(arch: ModelArch, s: Exl2Settings) -> int:
    """``ExLlamaV2Attention.scratch_space()``, the manual split's planning size, in bytes.

    The fixed scratch plus Q, K and V of one chunk and, with grouped-query attention, the
    ``repeat_kv`` copies of K and V at every query head over the whole context (``temp_kv_size``).
    """
    rows = s.chunk_len * s.batch_size
    q, kv = arch.num_attention_heads * arch.head_dim, arch.kv_dim
    temp_kv = 0 if arch.num_key_value_heads == arch.num_attention_heads else 2 * s.max_seq_len * s.batch_size * q * 2 + 128
    return attn_scratch(arch, s) + (rows * q * 2 + 128) + 2 * (rows * kv * 2 + 128) + temp_kv


def attn_plan_size(arch: ModelArch, s: Exl2Settings) -> int:
    """``ExLlamaV2Attention.temp_attn_size()`` in bytes: the attention-score reservation of a manual split.

    Our backend sets ``max_attention_size`` to the square of the chunk length. With flash-attention
    the library divides by its assumed saving, ``sqrt(max_attention_size) / 190``, in floating
    point; the same expression is evaluated here so that the bytes agree exactly.
    """
    max_attention = s.chunk_len**2
    att_max: float = min(max_attention, s.max_seq_len**2)
    if s.flash_attn:
        att_max //= max_attention**0.5 / 190
    return int(2 * att_max * arch.num_attention_heads * 2 + 128)


def mlp_scratch(arch: ModelArch, s: Exl2Settings) -> int:
    """``ExLlamaV2MLP`` / ``ExLlamaV2MoEMLP`` ``scratch_space_fixed()`` in bytes (also their ``scratch_space()``)."""
    rows = s.chunk_len * s.batch_size
    h, i = arch.hidden_size, arch.intermediate_size
    if arch.spec.is_moe:
        n_exp = arch.num_experts or 0
        state = rows * h * 2 + 128
        temp = rows * i * 2 + 128
        logits = rows * n_exp * 2 + 128
        dq = max(_dq(h, i, s), _dq(i, h, s))
        return 2 * state + 2 * temp + logits + dq
    temp_state = rows * h * 2 + 128
    temp_ab = rows * max(h, i) * 2 + 128
    dq = max(_dq(h, i, s), _dq(i, h, s))
    return temp_state + 2 * temp_ab + dq


def head_scratch(arch: ModelArch, s: Exl2Settings) -> int:
    """Top-level ``lm_head`` ``scratch_space_fixed()``: its dequant buffer only."""
    return _dq(arch.hidden_size, arch.vocab_size, s)


def cache_length(arch: ModelArch, mode: CacheMode, seq_len: int) -> int:
    """Tokens allocated per sequence: ``seq_len`` for every mode.

    ``ExLlamaV2Cache_Q`` rounds its ``max_seq_len`` up to ``q_block`` only after its tensors exist
    (``cache.py`` ``ExLlamaV2Cache_Q.__init__``), so allocation uses the requested length.
    """
    del arch, mode
    return seq_len


def _per_byte(bits: int) -> int:
    """Elements per byte of a cache tensor (``weights_per_element``): 1 at 8 bits, 2 at 4 bits."""
    return 8 // bits if bits < 8 else 1


def cache_layer_bytes(arch: ModelArch, s: Exl2Settings) -> int:
    """Bytes of one attention layer's K, V (and scales) for settings ``s``.

    Mirrors the tensor shapes of ``exllamav2/cache.py``: ``(B, S, Hkv, D // w)`` with integer
    division, FP16 for ``ExLlamaV2Cache`` and uint8 otherwise; scales ``(B, S, Hkv, D // 32)`` FP16.
    """
    mode = cache_mode(s.cache)
    rows = s.batch_size * cache_length(arch, mode, s.max_seq_len) * arch.num_key_value_heads
    d = arch.head_dim
    if mode.k_bits == 16:
        return 2 * rows * d * 2
    k = rows * (d // _per_byte(mode.k_bits))
    v = rows * (d // _per_byte(mode.v_bits))
    scales = 2 * rows * (d // 32) * 2 if mode.q_cache else 0
    return k + v + scales


def cache_staging_bytes(arch: ModelArch, s: Exl2Settings) -> int:
    """FP16 K+V staging tensors a quantized cache keeps per device (0 for FP16)."""
    mode = cache_mode(s.cache)
    if not mode.staged:
        return 0
    n = s.batch_size * cache_length(arch, mode, s.max_seq_len)
    return 2 * n * arch.kv_dim * 2


def rope_bytes(arch: ModelArch, s: Exl2Settings) -> int:
    """FP16 sin + cos tables ``(max_seq_len, rot_dim)`` per RoPE base, per device."""
    return arch.spec.rope_bases * 2 * s.max_seq_len * arch.rot_dim * 2


def matmul_attention_bytes(arch: ModelArch, s: Exl2Settings) -> int:
    """Attention weights of exllamav2's matmul attention path, bytes: what the backend runs without
    flash-attn (``config.no_sdpa``, because 0.3.2's SDPA branch is not causal for prompts).

    Per chunk it holds fp16 scores ``(B, nH, q, past + q)`` twice (scores + mask, then softmax) and
    the fp16 mask ``(B, 1, q, past + q)``; ``model.forward`` shrinks chunks so that
    ``q * (past + q) <= max_attention_size``, which the backend sets to ``chunk_len ** 2``
    (attn.py ``_attn_torch``, model.py ``forward``).
    """
    area = min(s.chunk_len**2, s.chunk_len * s.max_seq_len)
    return 2 * s.batch_size * arch.num_attention_heads * area * 2 + s.batch_size * area * 2


def _transients(arch: ModelArch, s: Exl2Settings) -> tuple[int, int, int]:
    """Peak short-lived bytes while (attention, MLP, head) forward one chunk at full context."""
    rows = s.chunk_len * s.batch_size
    res = rows * arch.hidden_size * 2 * (2 if arch.spec.residual_fp32 else 1)
    q = rows * arch.num_attention_heads * arch.head_dim * 2
    attn = 2 * res + 2 * q
    if not s.flash_attn and arch.num_key_value_heads != arch.num_attention_heads:
        # SDPA path: repeat_kv expands K and V to all query heads over past + chunk.
        attn += 2 * s.batch_size * arch.num_attention_heads * s.max_seq_len * arch.head_dim * 2
    if not s.flash_attn:
        attn += matmul_attention_bytes(arch, s)
    mlp = 2 * res
    head = res + rows * _pad32(arch.vocab_size) * 2
    return attn, mlp, head


def table_plan(*, arch: ModelArch, table: ModuleTable, settings: Exl2Settings) -> MemoryPlan:
    """The costs of ``table``'s modules under ``settings``: a :class:`MemoryPlan` (O(1) in the model size)."""
    s = settings
    a_scr, m_scr, h_scr = attn_scratch(arch, s), mlp_scratch(arch, s), head_scratch(arch, s)
    a_plan, a_attn = attn_plan_scratch(arch, s), attn_plan_size(arch, s)
    a_tr, m_tr, h_tr = _transients(arch, s)
    # load_autosplit's test forward: one (1, max_input_len) chunk at past_len 0 (model.py ~L560-625).
    t = Exl2Settings(max_seq_len=s.chunk_len, cache=s.cache, batch_size=1, max_input_len=s.chunk_len,
                     max_dq_size=s.max_dq_size, flash_attn=s.flash_attn)
    a_lt, m_lt, h_lt = _transients(arch, t)
    if arch.spec.parallel_decoder:
        # One module holds both; set_device_map reserves no attention size for it (not an ExLlamaV2Attention).
        a_scr = max(a_scr, m_scr)
        a_plan, a_attn = max(a_plan, m_scr), 0
        a_tr = max(a_tr, m_tr)
        a_lt = max(a_lt, m_lt)
    # set_device_map's per-device constant: sin/cos, hidden state and mask of one chunk.
    state_size = arch.hidden_size * s.chunk_len * s.batch_size * 2
    mask_size = s.chunk_len**2 * s.batch_size * 2
    constant = 2 * (arch.head_dim * s.max_seq_len * 2)
    costs = (  # in the order of the table's kinds (``exl2_modules.KIND_*``)
        ModuleKind(a_scr, a_tr, plan_bytes=a_plan, plan_attn_bytes=a_attn, load_transient_bytes=a_lt),
        ModuleKind(m_scr, m_tr, plan_bytes=m_scr, load_transient_bytes=m_lt),
        ModuleKind(),
        ModuleKind(h_scr, h_tr, plan_bytes=h_scr, load_transient_bytes=h_lt),
    )
    return MemoryPlan(
        table=table,
        costs=costs,
        cache_layer_bytes=cache_layer_bytes(arch, s),
        cache_staging_bytes=cache_staging_bytes(arch, s),
        rope_bytes=rope_bytes(arch, s),
        plan_constant_bytes=constant + state_size + mask_size,
    )


def memory_plan(*, arch: ModelArch, tensors: Iterable[TensorInfo], settings: Exl2Settings) -> MemoryPlan:
    """Describe ``arch`` with ``tensors`` loaded under ``settings`` as bytes per module.

    Raises:
        ModelConfigError: the tensors do not belong to this architecture.
    """
    return table_plan(arch=arch, table=module_table(arch, tensors), settings=settings)


def embedding_bytes(arch: ModelArch, tensors: Iterable[TensorInfo]) -> int:
    """Bytes of the token embedding, which ExLlamaV2 keeps in system RAM."""
    return group_modules(arch, tensors)["embed"]
