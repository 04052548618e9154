"""GGUF headers and llama.cpp's memory rules (llama-cpp-python 0.3.36, llama.cpp ``0c1e57098``).

Two jobs, both pure and cheap (no llama.cpp needed):

* **Header reading.** :func:`read_header` parses a GGUF header through a *byte-range reader*
  ``read(offset, length) -> bytes`` (a local file or HTTP range requests), reading only what the
  parser needs in ``chunk_bytes`` pieces and skipping long arrays (tokenizer tables) by seeking. The
  tensor data are never read. :func:`read_header_file` is the local-file shortcut.
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
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.errors import BadOptionError, WeightsHeaderError
from optimizer.formats.gguf_meta import (
    MAX_KEPT_NUMERIC,
    MAX_KEPT_OTHER,
    MAX_TENSOR_DIMS,
    KeepBudget,
    check_alignment,
    check_array,
    check_metadata,
    check_tensor,
    hparams,
)

#: A byte-range reader: ``read(offset, length)`` returns up to ``length`` bytes from ``offset``.
RangeReader = Callable[[int, int], bytes]

GGUF_MAGIC = b"GGUF"
#: Headers larger than this are refused (real ones are a few MB: the tokenizer dominates).
MAX_HEADER_BYTES = 256 * 2**20
DEFAULT_CHUNK_BYTES = 2 * 2**20

# ggml type id -> (name, block size in elements, bytes per block). Mirrors gguf.constants.GGML_QUANT_SIZES
# (checked in tests) so that header reading needs no numpy. Q8_1 (a matmul-only type, never stored) is left out.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
GGML_TYPE_IDS: dict[str, int] = {name.lower(): tid for tid, (name, _, _) in GGML_TYPES.items()}

#: KV-cache types llama.cpp accepts (``common/arg.cpp``).
KV_CACHE_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

#: llama_ftype (``general.file_type``) -> label, for the common ones.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

#: Architectures whose sliding-window layers use a second (iSWA) KV cache, with the dense-layer
#: period of ``hparams.set_swa_pattern(n)`` (layer ``il`` is SWA iff ``il % n < n - 1``).
SWA_PATTERNS: dict[str, int] = {"gemma2": 2, "gemma3": 6, "cohere2": 4}

# GGUF metadata value types: id -> struct format (None: string / array)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of ``n`` elements of ggml type ``type_name`` (``n`` a multiple of the block size)."""
    try:
        _, block, size = GGML_TYPES[GGML_TYPE_IDS[type_name.lower()]]
    except KeyError:
        raise WeightsHeaderError(f"unknown ggml type {type_name!r}") from None
    if n % block:
        raise WeightsHeaderError(f"{n} elements of {type_name} are not a multiple of its block size {block}")
    return n // block * size


# ----- header reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF header. ``shape`` is in ggml order (fastest dimension first)."""

    name: str
    type_id: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]


@dataclass(frozen=True)
class GgufHeader:
    """A parsed GGUF header. ``kv`` holds scalars, strings and short arrays; long arrays are
    replaced by their length under ``kv_array_len``. ``data_offset`` is where tensor data start."""

    version: int
    kv: Mapping[str, Any]
    kv_array_len: Mapping[str, int]
    tensors: tuple[GgufTensor, ...]
    data_offset: int
    header_bytes_read: int


class _Cursor:
    """Sequential reads over a range reader, fetched in ``chunk`` pieces; skips without fetching."""

    def __init__(self, read: RangeReader, chunk: int, name: str) -> None:
        self._read, self._chunk, self._name = read, chunk, name
        self.pos = 0
        self._buf = b""
        self._buf_start = 0
        self.fetched = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > MAX_HEADER_BYTES:
            raise WeightsHeaderError(f"{self._name}: GGUF header larger than {MAX_HEADER_BYTES // 2**20} MiB")
        end = self.pos + n
        if not (self._buf_start <= self.pos and end <= self._buf_start + len(self._buf)):
            keep = self._buf[self.pos - self._buf_start:] if self._buf_start <= self.pos < self._buf_start + len(self._buf) else b""
            want = max(self._chunk, n - len(keep))
            got = self._read(self.pos + len(keep), want)
            self.fetched += len(got)
            self._buf, self._buf_start = keep + got, self.pos
            if end > self._buf_start + len(self._buf):
                raise WeightsHeaderError(f"{self._name}: truncated GGUF header")
        out = self._buf[self.pos - self._buf_start:end - self._buf_start]
        self.pos = end
        return out

    def skip(self, n: int) -> None:
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    @property
    def name(self) -> str:
        return self._name

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 24:
            raise WeightsHeaderError(f"{self._name}: implausible GGUF string length {n}")
        return self.take(n).decode("utf-8", "replace")


def _value(c: _Cursor, vtype: int, key: str, kv_len: dict[str, int], budget: KeepBudget, depth: int = 0) -> Any:
    """One metadata value; arrays are checked (count, depth) before anything is read or skipped."""
    if vtype in _SCALAR:
        budget.spend(8)
        return c.unpack(_SCALAR[vtype])
    if vtype == _STRING:
        s = c.string()
        budget.spend(len(s))
        return s
    if vtype == _ARRAY:
        etype, count = c.unpack("<I"), c.unpack("<Q")
        size = struct.calcsize(_SCALAR[etype]) if etype in _SCALAR else None
        if etype not in _SCALAR and etype not in (_STRING, _ARRAY):
            raise WeightsHeaderError(f"{c.name}: unknown GGUF value type {etype} in {key!r}")
        check_array(name=c.name, key=key, etype=etype, count=count, elem_bytes=size, depth=depth + 1,
                    remaining=MAX_HEADER_BYTES - c.pos)
        keep = MAX_KEPT_NUMERIC if (size is not None and not key.startswith("tokenizer.")) else MAX_KEPT_OTHER
        if count > keep:
            kv_len[key] = count
            if size is not None:
                c.skip(count * size)
            elif etype == _STRING:
                for _ in range(count):
                    c.skip(c.unpack("<Q"))
            else:
                raise WeightsHeaderError(f"{c.name}: GGUF key {key!r} holds a long array of arrays")
            return None
        return [_value(c, etype, key, kv_len, budget, depth + 1) for _ in range(count)]
    raise WeightsHeaderError(f"{c.name}: unknown GGUF value type {vtype} for {key!r}")


def read_header(read: RangeReader, *, name: str = "<gguf>", chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> GgufHeader:
    """Parse a GGUF header (v2/v3) through a byte-range reader; tensor data are never read.

    ``read(offset, length)`` may return fewer bytes only at the end of the file. Remote use:
    wrap HTTP ``Range: bytes=a-b`` requests (``chunk_bytes`` per request, 2 MiB by default).
    Counts, array lengths, nesting and tensor shapes are checked before anything is allocated,
    and the metadata by :func:`optimizer.formats.gguf_meta.check_metadata`.

    Raises:
        WeightsHeaderError: not a GGUF file, truncated, malformed, or implausible.
    """
    c = _Cursor(read, chunk_bytes, name)
    if c.take(4) != GGUF_MAGIC:
        raise WeightsHeaderError(f"{name}: not a GGUF file (bad magic)")
    version = c.unpack("<I")
    if version not in (2, 3):
        raise WeightsHeaderError(f"{name}: unsupported GGUF version {version}")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    if n_tensors > 1 << 20 or n_kv > 1 << 20:
        raise WeightsHeaderError(f"{name}: implausible GGUF counts ({n_tensors} tensors, {n_kv} keys)")
    kv: dict[str, Any] = {}
    kv_len: dict[str, int] = {}
    budget = KeepBudget(name=name)
    for _ in range(n_kv):
        key = c.string()
        budget.spend(len(key) + 64)
        if key in kv or key in kv_len:
            raise WeightsHeaderError(f"{name}: GGUF key {key[:80]!r} appears twice")
        kv[key] = _value(c, c.unpack("<I"), key, kv_len, budget)
        if kv[key] is None:
            del kv[key]
    check_metadata(kv, kv_len, name=name)
    tensors: list[GgufTensor] = []
    seen: set[str] = set()
    for _ in range(n_tensors):
        tname = c.string()
        budget.spend(len(tname) + 128)
        if tname in seen:
            raise WeightsHeaderError(f"{name}: tensor {tname[:80]!r} appears twice")
        seen.add(tname)
        n_dims = c.unpack("<I")
        if n_dims > MAX_TENSOR_DIMS:
            raise WeightsHeaderError(f"{name}: tensor {tname!r} has {n_dims} dimensions")
        shape = tuple(c.unpack("<Q") for _ in range(n_dims))
        type_id, offset = c.unpack("<I"), c.unpack("<Q")
        if type_id not in GGML_TYPES:
            raise WeightsHeaderError(f"{name}: tensor {tname!r} has unknown ggml type {type_id}")
        _, block, size = GGML_TYPES[type_id]
        n = check_tensor(name=name, tname=tname, shape=shape, block=block)
        tensors.append(GgufTensor(name=tname, type_id=type_id, shape=shape, offset=offset, nbytes=-(-n // block) * size))
    align = check_alignment(kv.get("general.alignment", 32), name=name)
    data_offset = -(-c.pos // align) * align
    return GgufHeader(version=version, kv=kv, kv_array_len=kv_len, tensors=tuple(tensors),
                      data_offset=data_offset, header_bytes_read=c.fetched)


def http_range_reader(url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> RangeReader:
    """A :data:`RangeReader` over HTTP ``Range: bytes=a-b`` GET requests (redirects followed).

    ``headers`` may carry an ``Authorization`` header; it is sent, never logged. A server that
    ignores ``Range`` (status 200) is refused rather than downloading the whole file.
    """
    import urllib.error
    import urllib.request

    def read(offset: int, length: int) -> bytes:
        req = urllib.request.Request(url, headers={**(headers or {}), "Range": f"bytes={offset}-{offset + length - 1}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (http(s) URL from a source)
                if resp.status == 200 and offset + length < int(resp.headers.get("Content-Length") or 0):
                    raise WeightsHeaderError(f"{url.split('?')[0]}: server ignores HTTP range requests")
                data: bytes = resp.read(length)
                return data
        except urllib.error.HTTPError as e:
            if e.code == 416:  # range past the end of the file
                return b""
            raise WeightsHeaderError(f"{url.split('?')[0]}: HTTP {e.code} reading the GGUF header") from None
        except (urllib.error.URLError, OSError) as e:
            raise WeightsHeaderError(f"{url.split('?')[0]}: cannot read the GGUF header ({e})") from None

    return read


def read_header_file(path: Path, *, chunk_bytes: int = 1 << 20) -> GgufHeader:
    """:func:`read_header` over a local file."""
    try:
        with open(path, "rb") as f:
            def read(offset: int, length: int) -> bytes:
                f.seek(offset)
                return f.read(length)

            return read_header(read, name=str(path), chunk_bytes=chunk_bytes)
    except OSError as e:
        raise WeightsHeaderError(f"{path}: cannot read ({e.strerror})") from None


# ----- model facts ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufModel:
    """What the memory rules need from a header (llama.cpp's hparams). Sizes in elements/tokens.

    ``n_head_kv`` is per layer (GGUF allows a scalar or an array). ``layer_bytes[i]`` are the
    weight bytes of ``blk.i``; ``output_bytes`` those of the output layer (``output_norm`` and
    ``output.weight``, or a copy of ``token_embd`` when ``tied``); ``embd_bytes`` of ``token_embd``.
    """

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int
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
        arch=hp.arch, n_layer=n_layer, n_embd=hp.n_embd, n_ff=hp.n_ff, n_head=hp.n_head, n_head_kv=hp.n_head_kv,
        head_dim_k=hp.head_dim_k, head_dim_v=hp.head_dim_v, n_vocab=hp.n_vocab, n_ctx_train=hp.n_ctx_train,
        n_swa=hp.n_swa, qk_norm="blk.0.attn_q_norm.weight" in names, tied=tied, layer_bytes=tuple(layer),
        output_bytes=output, embd_bytes=embd, total_bytes=total,
    )


def config_from_header(header: GgufHeader) -> dict[str, Any]:
    """The JSON-like config a GGUF :class:`~optimizer.variant.Variant` carries: the header's scalar
    keys under ``"gguf"`` plus ``architecture``, ``vocab_size`` and ``max_position_embeddings``."""
    kv = {k: v for k, v in header.kv.items() if not k.startswith("tokenizer.ggml.") or not isinstance(v, list)}
    arch = str(kv.get("general.architecture", ""))
    vocab = header.kv_array_len.get("tokenizer.ggml.tokens") or len(header.kv.get("tokenizer.ggml.tokens") or []) \
        or int(kv.get(f"{arch}.vocab_size", 0) or 0)
    return {
        "gguf": kv,
        "architecture": arch,
        "vocab_size": vocab,
        "max_position_embeddings": int(kv.get(f"{arch}.context_length", 4096) or 4096),
    }


def file_type_label(kv: Mapping[str, Any], fallback: str) -> str:
    """``Q4_K_M`` from ``general.file_type``, else a quant name found in ``fallback``, else ``fallback``."""
    ft = kv.get("general.file_type")
    if isinstance(ft, int) and ft in FILE_TYPES:
        return FILE_TYPES[ft]
    m = re.search(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|BF16|F16|F32)(?:$|[-_.])", fallback)
    from optimizer.textsafe import strip_controls

    return m.group(1).upper() if m else strip_controls(fallback)


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
