"""GGUF headers and llama.cpp's memory rules (llama-cpp-python 0.3.36, llama.cpp ``0c1e57098``).

Two jobs, both pure and cheap (no llama.cpp needed):

* **Header reading** lives in :mod:`optimizer.formats.gguf_header` (re-exported here):
  :func:`read_header` over a byte-range reader, never reading tensor data, every count and shape
  checked before allocation, metadata validated by :mod:`optimizer.formats.gguf_meta`.
* **Memory rules.** :func:`memory_plan` turns a header-derived :class:`GgufModel` and
  :class:`LlamaSettings` into a :class:`~optimizer.vram.MemoryPlan` of what llama.cpp puts on the
  *device* (the GPU) for ``n_gpu_layers``:

  - weights: ``n_gpu_layers = k`` offloads the output layer first, then the last ``k - 1``
    repeating layers; ``token_embd`` always stays in host memory; a tied output (no
    ``output.weight``) is a second copy of ``token_embd`` on the output device;
  - KV cache: ``C = ceil256(n_ctx)`` cells per layer, ``C * (row(type_k, Hkv*Dk) + row(type_v, Hkv*Dv))``
    bytes, K and V types separately (``row`` is ggml's block-quantized row size);
  - compute buffer: the worst of three graph phases (logits, attention, FFN) for one ubatch;
  - the output buffer (``4 * n_vocab`` bytes per sequence) is host memory, reported separately.

All sizes are bytes unless a name says otherwise. The rules and their checks against llama.cpp's
own log are documented in ``docs/gguf-demo.md`` and tested in ``tests/test_gguf_*.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from optimizer.errors import BadOptionError, WeightsHeaderError
from optimizer.formats.gguf_header import (  # noqa: F401  (re-exported: the header API's historic home)
    DEFAULT_CHUNK_BYTES,
    FILE_TYPES,
    GGML_TYPE_IDS,
    GGML_TYPES,
    GGUF_MAGIC,
    MAX_HEADER_BYTES,
    GgufHeader,
    GgufTensor,
    RangeReader,
    config_from_header,
    file_type_label,
    http_range_reader,
    read_header,
    read_header_file,
)
from optimizer.formats.gguf_meta import Hparams, hparams

#: KV-cache types llama.cpp accepts (``common/arg.cpp``).
KV_CACHE_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

#: Architectures whose sliding-window layers use a second (iSWA) KV cache, with the dense-layer
#: period of ``hparams.set_swa_pattern(n)`` (layer ``il`` is SWA iff ``il % n < n - 1``).
SWA_PATTERNS: dict[str, int] = {"gemma2": 2, "gemma3": 6, "cohere2": 4}

def row_bytes(type_name: str, n: int) -> int:
    """Bytes of ``n`` elements of ggml type ``type_name`` (``n`` a multiple of the block size)."""
    try:
        _, block, size = GGML_TYPES[GGML_TYPE_IDS[type_name.lower()]]
    except KeyError:
        raise WeightsHeaderError(f"unknown ggml type {type_name!r}") from None
    if n % block:
        raise WeightsHeaderError(f"{n} elements of {type_name} are not a multiple of its block size {block}")
    return n // block * size


# ----- model facts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufModel(Hparams):
    """What the memory rules need from a header: llama.cpp's validated hparams (:class:`Hparams`, sizes in
    elements/tokens; ``n_head_kv`` is per layer) plus what the tensors say.

    ``layer_bytes[i]`` are the weight bytes of ``blk.i``; ``output_bytes`` those of the output layer
    (``output_norm`` and ``output.weight``, or a copy of ``token_embd`` when ``tied``); ``embd_bytes`` of
    ``token_embd``.
    """

    qk_norm: bool
    tied: bool
    layer_bytes: tuple[int, ...]
    output_bytes: int
    embd_bytes: int
    total_bytes: int

    @property
    def is_iswa(self) -> bool:
        return self.n_swa > 0 and self.arch in SWA_PATTERNS


_BLK_RE = re.compile(r"^blk\.(\d+)\.")


def model_from_config(config: Mapping[str, Any], tensors: Any, *, where: str = "GGUF header") -> GgufModel:
    """:class:`GgufModel` from a GGUF variant's config (``gguf_config``) and tensors (name, nbytes).

    Raises:
        WeightsHeaderError / UnsupportedArchitectureError: metadata fails
            :func:`~optimizer.formats.gguf_meta.hparams`, or tensors lie beyond ``block_count`` or
            leave a layer empty (:func:`~optimizer.formats.accounting.check_gguf`).
    """
    from optimizer.formats.accounting import check_gguf

    hp = hparams(config, name=where)
    n_layer = hp.n_layer
    tensors = list(tensors)
    check_gguf(n_layer=n_layer, tensors=tensors, where=where)
    layer = [0] * n_layer
    output = embd = total = 0
    names = set()
    for t in tensors:
        names.add(t.name)
        total += t.nbytes
        m = _BLK_RE.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer[int(m.group(1))] += t.nbytes
        elif t.name.startswith("token_embd."):
            embd += t.nbytes
        else:
            output += t.nbytes
    tied = "output.weight" not in names
    if tied:
        output += embd
    return GgufModel(
        **{f.name: getattr(hp, f.name) for f in fields(Hparams)}, qk_norm="blk.0.attn_q_norm.weight" in names,
        tied=tied, layer_bytes=tuple(layer), output_bytes=output, embd_bytes=embd, total_bytes=total,
    )


# ----- memory rules -----------------------------------------------------------------------------


def ceil_to(n: int, step: int) -> int:
    return -(-n // step) * step


#: llama.cpp pads n_ctx to this many cells.
CTX_PAD = 256


@dataclass(frozen=True)
class LlamaSettings:
    """A llama-cpp-python ``Llama(...)`` configuration as far as memory is concerned.

    Attributes:
        n_ctx: requested context (tokens); llama.cpp pads it to a multiple of 256 cells.
        type_k / type_v: KV-cache ggml types (``f16``, ``q8_0``, ``q4_0``...).
        flash_attn: ``Llama(flash_attn=True)``; required for a quantized V cache.
        n_batch / n_ubatch: llama-cpp-python defaults 512 / 512; ``n_batch`` is clamped to
            ``n_ctx`` (the requested one) in Python, ``n_ubatch`` to ``n_batch``.
        n_seq: sequences (streams); llama-cpp-python uses 1.
        n_gpu_layers: layers offloaded, output layer first (None = all = ``n_layer + 1``).
        swa_full: full-size SWA cache (llama-cpp-python / C default True).
    """

    n_ctx: int
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    n_batch: int = 512
    n_ubatch: int = 512
    n_seq: int = 1
    n_gpu_layers: int | None = None
    swa_full: bool = True

    def __post_init__(self) -> None:
        for t in (self.type_k, self.type_v):
            if t.lower() not in KV_CACHE_TYPES:
                raise BadOptionError(f"unknown KV cache type {t!r} (choose from {', '.join(KV_CACHE_TYPES)})")

    @property
    def cells(self) -> int:
        """KV cells per sequence: ``ceil256(n_ctx / n_seq)``."""
        return ceil_to(-(-self.n_ctx // self.n_seq), CTX_PAD)

    @property
    def ubatch(self) -> int:
        """Effective ``n_ubatch`` = min(n_ctx, n_batch, n_ubatch)."""
        return min(self.n_ctx, self.n_batch, self.n_ubatch)


def check_settings(s: LlamaSettings, m: GgufModel | None = None) -> None:
    """Reject what llama.cpp refuses: a quantized V cache without flash attention, and (with flash
    attention) a quantized K/V type whose block size does not divide the head dimension."""
    if s.type_v.lower() not in ("f32", "f16", "bf16") and not s.flash_attn:
        raise BadOptionError(f"quantized V cache ({s.type_v}) requires flash_attn=True in llama.cpp")
    if m is not None and s.flash_attn:
        for t, dim in ((s.type_k, m.head_dim_k), (s.type_v, m.head_dim_v)):
            block = GGML_TYPES[GGML_TYPE_IDS[t.lower()]][1]
            if dim % block:
                raise BadOptionError(f"KV cache type {t} needs a head dimension that is a multiple of {block} "
                                     f"with flash attention (this model has {dim})")


def kv_layer_bytes(m: GgufModel, s: LlamaSettings, layer: int) -> int:
    """KV bytes of one layer: cells x streams x (row(type_k, Hkv*Dk) + row(type_v, Hkv*Dv))."""
    hkv = m.n_head_kv[layer]
    if hkv == 0:
        return 0
    cells = s.cells
    if m.is_iswa and not s.swa_full and layer % SWA_PATTERNS[m.arch] < SWA_PATTERNS[m.arch] - 1:
        cells = min(cells, ceil_to(m.n_swa + s.ubatch, CTX_PAD))
    return cells * s.n_seq * (row_bytes(s.type_k, hkv * m.head_dim_k) + row_bytes(s.type_v, hkv * m.head_dim_v))


def kv_bytes(m: GgufModel, s: LlamaSettings) -> int:
    """Total KV-cache bytes (= llama.cpp's ``llama_kv_cache: size`` line)."""
    return sum(kv_layer_bytes(m, s, i) for i in range(m.n_layer))


@dataclass(frozen=True)
class ComputePhases:
    """Peak live bytes of the three graph phases for one ubatch (llamacpp-memory.md §4.4)."""

    logits: int
    attention: int
    ffn: int

    @property
    def peak(self) -> int:
        return max(self.logits, self.attention, self.ffn)


def compute_phases(m: GgufModel, s: LlamaSettings) -> ComputePhases:
    """The compute-buffer phases llama.cpp reserves against a full cache (bytes, CPU backend).

    ``logits = 4*V*U + 12*U*E``; ``attention = 4*U*C*H + mask + 4*U*(5E + 2*Hkv*Dk [+E])`` (only
    without flash attention); ``ffn = 4*U*(3F + 4E) + mask``; ``mask = U * cells * (4 or 2 with FA)``
    per KV cache (two for iSWA models).
    """
    u, e, c = s.ubatch, m.n_embd, s.cells
    n_caches = 2 if m.is_iswa else 1
    mask = u * c * (2 if s.flash_attn else 4) * n_caches
    ek = max(m.n_head_kv) * m.head_dim_k
    logits = 4 * m.n_vocab * u + 12 * u * e
    attention = 0
    if not s.flash_attn:
        attention = 4 * u * c * m.n_head + mask + 4 * u * (5 * e + 2 * ek + (e if m.qk_norm else 0))
    ffn = 4 * u * (3 * m.n_ff + 4 * e) + mask
    return ComputePhases(logits=logits, attention=attention, ffn=ffn)


def output_buffer_bytes(m: GgufModel, s: LlamaSettings) -> int:
    """Host output buffer at context creation: ``4 * V * n_seq`` (grows with requested outputs)."""
    return 4 * m.n_vocab * s.n_seq


def gpu_layer_start(m: GgufModel, n_gpu_layers: int | None) -> int:
    """First offloaded layer id (``L`` is the output layer): ``max(L + 1 - k, 0)``."""
    k = m.n_layer + 1 if n_gpu_layers is None or n_gpu_layers < 0 else n_gpu_layers
    return max(m.n_layer + 1 - k, 0)


def split_layers(m: GgufModel, *, n_gpu_layers: int | None, tensor_split: tuple[float, ...]) -> dict[int, int]:
    """Device index of every offloaded layer id (``0..L-1`` repeating, ``L`` output), as llama.cpp's
    LAYER split does: cumulative normalized ``tensor_split`` fractions, ``upper_bound`` per layer."""
    start = gpu_layer_start(m, n_gpu_layers)
    act = m.n_layer + 1 - start
    if act <= 0:
        return {}
    fr = tensor_split or (1.0,)
    total = sum(fr)
    cum, acc = [], 0.0
    for f in fr:
        acc += f / total
        cum.append(acc)
    out: dict[int, int] = {}
    for il in range(start, m.n_layer + 1):
        x = (il - start) / act
        dev = next((d for d, cv in enumerate(cum) if cv > x), len(cum) - 1)
        out[il] = dev
    return out


@dataclass(frozen=True)
class DevicePrediction:
    """Predicted llama.cpp buffers of one device in bytes (``compute`` within a tolerance)."""

    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute


def predict_devices(m: GgufModel, s: LlamaSettings, *, tensor_split: tuple[float, ...] = ()) -> tuple[DevicePrediction, ...]:
    """Per-GPU prediction for a LAYER split (weights and KV exact; compute per §4.4 rules)."""
    check_settings(s, m)
    where = split_layers(m, n_gpu_layers=s.n_gpu_layers, tensor_split=tensor_split)
    n_dev = max(len(tensor_split), 1)
    ph = compute_phases(m, s)
    w, kv, comp = [0] * n_dev, [0] * n_dev, [0] * n_dev
    for il, d in where.items():
        if il == m.n_layer:
            w[d] += m.output_bytes
            comp[d] = max(comp[d], ph.logits)
        else:
            w[d] += m.layer_bytes[il]
            kv[d] += kv_layer_bytes(m, s, il)
            comp[d] = max(comp[d], ph.attention, ph.ffn)
    return tuple(DevicePrediction(weights=w[i], kv=kv[i], compute=comp[i]) for i in range(n_dev))


def memory_plan(m: GgufModel, s: LlamaSettings) -> Any:
    """The offloaded part of the model as a :class:`~optimizer.vram.MemoryPlan`, in load order.

    One module per offloaded repeating layer (weights, one KV layer, attention/FFN compute peak as
    its transient) and the output module (output weights, logits phase). Placed as ``single``
    this gives the device total of ``predict_devices`` with one GPU. When layers have different
    KV sizes (per-layer ``head_count_kv``, iSWA with ``swa_full=False``) the per-layer cache is the
    largest layer's (conservative).
    """
    from optimizer.vram import MemoryPlan, ModuleCost

    check_settings(s, m)
    start = gpu_layer_start(m, s.n_gpu_layers)
    ph = compute_phases(m, s)
    layer_transient = max(ph.attention, ph.ffn)
    mods = [ModuleCost(name=f"blk.{il}", weight_bytes=m.layer_bytes[il], transient_bytes=layer_transient,
                       kv_layer=True) for il in range(start, m.n_layer)]
    if start <= m.n_layer:
        mods.append(ModuleCost(name="output", weight_bytes=m.output_bytes, transient_bytes=ph.logits))
    per_layer = max((kv_layer_bytes(m, s, il) for il in range(start, m.n_layer)), default=0)
    return MemoryPlan(modules=tuple(mods), cache_layer_bytes=per_layer, cache_staging_bytes=0, rope_bytes=0)
