"""ExLlamaV3 1.6.5 (EXL3) memory rules: from a variant's metadata to bytes per module and per cache layer.

Rules read from the exllamav3 1.6.5 sources (facts: shared reference ``exllamav3-memory.md``) and
checked byte for byte by ``tests/test_oracle_exllamav3.py``, which loads header-only models with the
library's own Python code on CPU and counts the tensors every module keeps:

* Modules are exllamav3's top-level ones, in load order: the token embedding (kept in **system RAM**:
  ``Embedding`` has ``caps["prefer_cpu"]``, quantized tables too), one ``TransformerBlock`` per layer
  (attention and MLP together, with their norms), the final norm, then ``lm_head`` on the GPU.
* Weights are the stored tensor bytes (safetensors headers, or ``quantization_config.json``), with
  two load-time changes: the EXL3 codebook marker of every linear (``.mul1`` / ``.mcg``, an int32
  scalar) is replaced by one shared CPU tensor (0 bytes on the GPU), and FP32 norm weights are
  loaded as FP16 (``float2half``). Tensors the text model never loads (a vision tower, MTP layers)
  are reported, not counted.
* KV cache, per attention layer and token: FP16 ``4 * Hkv * D`` bytes; quantized K/V at ``k`` and
  ``v`` bits (2..8 each, mode name ``k4v6``) ``Hkv * D * (k + v + 1) / 8`` bytes: the packed K and V
  plus one FP16 scale per 32 elements of each. ``max_num_tokens`` must be a multiple of 256 (pages).
* No per-device staging copy of a quantized cache exists (decode reads the packed cache); the
  prefill dequantizes into per-call scratch, counted as a transient.
* Transients (a documented approximation, not checked by the oracle): per block, the FP16 weight a
  linear reconstructs for more than 144 rows, the FP32 residual stream and MLP intermediate of one
  chunk, the quantized-cache prefill scratch; on the head device, the chunk's logits.
* Overhead: the CUDA context, Triton modules and allocator slack, a constant per GPU
  (:data:`DEFAULT_OVERHEAD_BYTES`, overridable) that exllamav3 does not model.

Example (Llama-3-8B shapes, every decoder linear at 4 bits, head at 6): decoder blocks 3333.5 MiB,
``lm_head`` 376.0 MiB, embedding 1002 MiB in system RAM; a k4v4 cache of 8192 tokens is
32 layers x 8192 x 8 x 128 x 9 / 8 B = 288 MiB.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optimizer.arch import ARCHITECTURES as _EXL2_ARCHS
from optimizer.arch import ArchSpec, ModelArch
from optimizer.errors import BadOptionError, ModelConfigError, UnsupportedArchitectureError
from optimizer.variant import TensorInfo
from optimizer.vram import MIB

FORMAT = "exl3"

#: Cache page size (``exllamav3/constants.py`` ``PAGE_SIZE``): cache lengths are multiples of it.
PAGE_SIZE = 256

#: Rows above which an EXL3 linear reconstructs its FP16 weight (``AUTO_RECONSTRUCT_THRESHOLD``).
RECONSTRUCT_ROWS = 144

#: Rows the autosplit measuring forward sends to the head (``Model.load(max_output_size=32)``).
MAX_OUTPUT_SIZE = 32

#: ``Model.load`` default ``max_chunk_size`` (rows of the measuring forward).
DEFAULT_CHUNK = 2048

#: Quantized-cache prefill scratch the autosplit measure reserves: 256 pages (``EXL3_QC_STAGING_PAGES``).
QC_STAGING_PAGES = 256

#: CUDA context + Triton modules + allocator slack per GPU, bytes. Not modelled by exllamav3 and not
#: calibrated on a GPU here; the same figure as exl2's. Override per GPU with ``--overhead``.
DEFAULT_OVERHEAD_BYTES = 400 * MIB

#: Architectures whose modules and cache layers these rules size (dimensions read as for exl2, see
#: ``optimizer.arch``). exllamav3 1.6.5 knows ~70; those with sliding-window rings, recurrent
#: (GatedDeltaNet, Mamba) or MLA caches are refused by name.
ARCHITECTURES: dict[str, ArchSpec] = {
    **{name: _EXL2_ARCHS[name] for name in (
        "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForConditionalGeneration", "Phi3ForCausalLM",
        "CohereForCausalLM")},
    "MiniMaxM2ForCausalLM": ArchSpec(is_moe=True),  # block-sparse MoE, full attention with per-layer q/k norms
    "Glm4MoeForCausalLM": ArchSpec(is_moe=True),  # GLM-4.5/4.6: dense first layers, shared experts, MTP layers
}

_BITS = range(2, 9)
_MODE_RE = re.compile(r"^k([2-8])v([2-8])$")


@dataclass(frozen=True)
class CacheMode:
    """One exllamav3 cache layer type: ``fp16`` (``CacheLayer_fp16``) or ``k<b>v<b>`` (``CacheLayer_quant``)."""

    name: str
    k_bits: int
    v_bits: int

    @property
    def quantized(self) -> bool:
        return self.k_bits != 16

    def bytes_per_token_layer(self, kv_dim: int) -> int:
        """Bytes of K + V (+ scales) per token per attention layer (``kv_dim = Hkv * D``)."""
        if not self.quantized:
            return 4 * kv_dim
        return kv_dim * (self.k_bits + self.v_bits + 1) // 8

    def layer_call(self) -> str:
        """The ``Cache(...)`` keyword arguments that select this mode."""
        if not self.quantized:
            return "layer_type=CacheLayer_fp16"
        return f"layer_type=CacheLayer_quant, k_bits={self.k_bits}, v_bits={self.v_bits}"


#: Every valid cache mode name: ``fp16`` and ``k2v2`` .. ``k8v8`` (K and V bits independent).
CACHE_MODE_NAMES: tuple[str, ...] = ("fp16",) + tuple(f"k{k}v{v}" for k in _BITS for v in _BITS)

#: How the valid names are described in an error message.
CACHE_MODE_HELP = "fp16 or k<bits>v<bits> with 2-8 bits each, e.g. k4v4, k4v6"

#: The modes a search or a fit tries when none are named.
DEFAULT_CACHE_MODES: tuple[str, ...] = ("fp16", "k8v8", "k6v6", "k4v4", "k3v3")


def cache_mode(name: str) -> CacheMode:
    """Parse ``fp16`` or ``k<2-8>v<2-8>`` (e.g. ``k4v6``).

    Raises:
        BadOptionError: anything else (exllamav2 names such as ``q4`` get a hint).
    """
    n = name.strip().lower()
    if n == "fp16":
        return CacheMode("fp16", 16, 16)
    m = _MODE_RE.match(n)
    if m:
        return CacheMode(n, int(m.group(1)), int(m.group(2)))
    hint = " (for a 4-bit cache write k4v4)" if n in ("q4", "q6", "q8", "fp8") else ""
    raise BadOptionError(
        f"unknown EXL3 cache mode {name!r}: use fp16 or k<bits>v<bits> with 2-8 bits each, e.g. k4v6{hint}"
    )


@dataclass(frozen=True)
class Exl3Settings:
    """Runtime settings that change memory, validated at construction.

    Attributes:
        max_num_tokens: cache length in tokens (``Cache(max_num_tokens=...)``), a multiple of 256.
        cache: cache mode name (``fp16``, ``k4v4``, ...).
        max_chunk_size: rows per forward (``Model.load(max_chunk_size=...)``, generator chunk).
        max_output_size: rows reaching the head in the autosplit measure.
    """

    max_num_tokens: int
    cache: str = "fp16"
    max_chunk_size: int = DEFAULT_CHUNK
    max_output_size: int = MAX_OUTPUT_SIZE

    def __post_init__(self) -> None:
        if self.max_num_tokens < PAGE_SIZE or self.max_num_tokens % PAGE_SIZE:
            raise BadOptionError(
                f"EXL3 cache length must be a positive multiple of {PAGE_SIZE} tokens, got {self.max_num_tokens}"
            )
        if self.max_chunk_size < 1 or self.max_output_size < 1:
            raise BadOptionError("chunk length must be positive")
        cache_mode(self.cache)


def check_architecture(arch_name: str) -> None:
    """Refuse an architecture these rules do not size, by name.

    Raises:
        UnsupportedArchitectureError: not in :data:`ARCHITECTURES`.
    """
    if arch_name not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch_name!r} is not sized by exl2opt's EXL3 model (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}); models with sliding-window rings, recurrent or MLA caches "
            "are not modelled"
        )


_MARKERS = (".mul1", ".mcg")
_DTYPE_SIZE = {"BF16": 2, "F32": 4, "F64": 8}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def device_bytes(t: TensorInfo) -> int:
    """Bytes one stored tensor occupies on the GPU once loaded (see the module docstring).

    Besides the codebook marker (0) and FP32 norms (halved): an FP32 linear bias is loaded as FP16, a
    MoE router's score-correction bias stays FP16 or becomes FP32, and the packed sign bits of older
    quants (``.su`` / ``.sv``, int16, 16 signs each) are unpacked to FP16 vectors
    (``LinearEXL3.unpack_bf``), 16 times their stored size.
    """
    if t.name.endswith(_MARKERS) and t.dtype == "I32" and not t.shape:
        return 0
    if t.dtype == "F32" and ("norm" in t.name.rsplit(".", 2)[-2] or t.name.endswith(".bias")):
        return t.nbytes // 2
    if t.dtype == "I16" and t.name.endswith((".su", ".sv")):
        return t.nbytes * 16
    if t.name.endswith(".e_score_correction_bias") and t.dtype != "F16":  # MoE router bias: FP16 kept, else FP32
        return t.nbytes // max(1, _DTYPE_SIZE.get(t.dtype, 4)) * 4
    return t.nbytes


@dataclass(frozen=True)
class ModuleBytes:
    """A variant's tensors grouped into exllamav3's top-level modules (bytes on the device).

    Attributes:
        modules: ``(key, bytes)`` of the GPU modules in load order (blocks, final norm, head).
        embedding: bytes of the token embedding, kept in system RAM.
        not_loaded: bytes of stored tensors the text model never loads (vision tower, MTP, ...).
        n_linears: EXL3 linears seen (one codebook marker each).
    """

    modules: tuple[tuple[str, int], ...]
    embedding: int
    not_loaded: int
    n_linears: int


def group_modules(arch: ModelArch, tensors: Iterable[TensorInfo], *, extra_layers: int = 0) -> ModuleBytes:
    """Bytes per exllamav3 top-level module, in load order.

    ``extra_layers``: layers stored after the decoder that the text model does not load (GLM's
    multi-token-prediction layers, ``num_nextn_predict_layers``); they are reported as not loaded.

    Raises:
        ModelConfigError: a layer index beyond ``num_hidden_layers`` (+ ``extra_layers``), or no head
            tensors and an untied config.
    """
    prefix = arch.spec.lm_prefix
    n = arch.num_hidden_layers
    blocks = [0] * n
    embed = norm = head = other = n_lin = 0
    head_seen = False
    for t in tensors:
        name = t.name
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
        elif prefix:
            other += t.nbytes
            continue
        if name.endswith(".trellis"):
            n_lin += 1
        b = device_bytes(t)
        if name.startswith("model.embed_tokens."):
            embed += t.nbytes
        elif name.startswith("lm_head."):
            head += b
            head_seen = True
        elif name.startswith("model.norm."):
            norm += b
        else:
            m = _LAYER_RE.match(name)
            if not m:
                other += t.nbytes
                continue
            i = int(m.group(1))
            if n <= i < n + extra_layers:
                other += t.nbytes
                continue
            if i >= n:
                raise ModelConfigError(f"weights hold layer {i} but config.json says num_hidden_layers = {n}")
            blocks[i] += b
    if not head_seen:
        if not arch.tie_word_embeddings:
            raise ModelConfigError("the weights hold no lm_head and config.json does not tie it to the embedding")
        head = 2 * arch.hidden_size * _pad(arch.vocab_size, 128)  # alt_key: an FP16 copy of the embedding
    mods = tuple([(f"model.layers.{i}", blocks[i]) for i in range(n)] + [("model.norm", norm), ("lm_head", head)])
    return ModuleBytes(modules=mods, embedding=embed, not_loaded=other, n_linears=n_lin)


def mtp_layers(config: Mapping[str, Any]) -> int:
    """Multi-token-prediction layers a checkpoint stores after the decoder (``num_nextn_predict_layers``)."""
    v = config.get("num_nextn_predict_layers", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16 else 0


def _pad(n: int, to: int) -> int:
    return n + (-n % to)


def cache_layer_bytes(arch: ModelArch, s: Exl3Settings) -> int:
    """K + V (+ scales) bytes of one attention layer's cache (``CacheLayer_*.storage_size()``)."""
    return s.max_num_tokens * cache_mode(s.cache).bytes_per_token_layer(arch.kv_dim)


def kv_layers(arch: ModelArch) -> int:
    """Attention layers that own a cache layer: every layer for the supported architectures."""
    return arch.num_hidden_layers


def qc_prefill_scratch(arch: ModelArch, s: Exl3Settings) -> int:
    """Quantized-cache prefill scratch the autosplit measure reserves on each attention's device (bytes).

    FP16 K+V of 256 pages, plus the FP32 accumulator ``round_up(c, 128) * nH * next_pow2(D) * 4``
    (``modules/attn.py`` ``autosplit_extra_measure``); 0 for an FP16 cache.
    """
    if not cache_mode(s.cache).quantized:
        return 0
    d_pow2 = 1 << (arch.head_dim - 1).bit_length()
    staging = 2 * QC_STAGING_PAGES * PAGE_SIZE * arch.kv_dim * 2
    return staging + _pad(s.max_chunk_size, 128) * arch.num_attention_heads * d_pow2 * 4


def _recons(rows: int, in_f: int, out_f: int) -> int:
    """FP16 weight an EXL3 linear reconstructs for ``rows`` input rows (0 at or below 144 rows)."""
    if rows <= RECONSTRUCT_ROWS:
        return 0
    return 2 * _pad(in_f, 128) * min(_pad(out_f, 128), 32768)


def block_transient(arch: ModelArch, s: Exl3Settings, *, rows: int) -> int:
    """Peak short-lived bytes while one block forwards ``rows`` rows (approximation, bytes).

    Attention: FP32 residual in and out, Q/K/V/O activations in FP16, the largest attention
    reconstruct, the quantized-cache prefill scratch. MLP: FP32 residual in and out, the FP32 gate
    and up intermediates, the largest MLP reconstruct (one expert's for MoE).
    """
    h, d, i = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_attention_heads * d, arch.kv_dim
    res = 2 * rows * h * 4
    attn = res + rows * (2 * q + 2 * kv) * 2 + max(_recons(rows, h, q), _recons(rows, q, h))
    attn += qc_prefill_scratch(arch, s) if rows >= PAGE_SIZE else 0
    mlp = res + 2 * rows * i * 4 + max(_recons(rows, h, i), _recons(rows, i, h))
    if arch.spec.is_moe:
        mlp += rows * (arch.num_experts or 0) * 4
    return max(attn, mlp)


def head_transient(arch: ModelArch, *, rows: int) -> int:
    """Logits of ``rows`` rows (FP16, vocab padded to 128) plus the head's reconstruct (bytes)."""
    vp = _pad(arch.vocab_size, 128)
    return rows * vp * 2 + rows * arch.hidden_size * 2 + _recons(rows, arch.hidden_size, arch.vocab_size)
