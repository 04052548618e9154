"""TEST DOUBLE: a plain-torch CPU stand-in for ``exllamav2_ext`` (the compiled extension of exllamav2 0.3.2).

It lets the *real* exllamav2 0.3.2 Python code load and run an FP16 (unquantized) model on the CPU,
so the exllamav2 backend can be tested end to end without a GPU. Only for tests, and only in a
**subprocess**: :func:`install` patches ``torch.cuda`` process-wide, and importing exllamav2 sets
``torch.set_num_threads(1)`` for the whole process.

What it does:

* :func:`install` (before anything imports exllamav2) checks that exllamav2 is 0.3.2, puts this
  module's kernels into ``sys.modules["exllamav2_ext"]`` (so ext.py skips its JIT build), points the
  ``torch.cuda`` calls exllamav2 makes at the CPU (streams, devices, synchronize, memory statistics),
  then imports exllamav2 and rewires its device helpers (``_torch_device``, ``safe_move_tensor``,
  ``exllamav2.device.torch``) so that "device N" is the CPU.
* Every ext function exllamav2 may call but this stand-in does not implement raises
  ``NotImplementedError("exllamav2_ext.<name> ...")``: a path the stand-in does not cover fails
  loudly and by name, never silently.
* The kernels below were written from the CUDA sources shipped with the 0.3.2 wheel
  (``exllamav2_ext/cuda/rms_norm.cu``, ``rope.cu``, ``cache.cu``, ``cache_q.cuh``,
  ``ext_stloader.cpp``, ``ext_cache.cpp``); each docstring names its source and the semantics kept.
  Not byte-checked against a GPU here (``scripts/gpu-check.sh`` compares Q-cache bytes on one).

Device memory: there is none. ``mem_get_info`` reports ``EXL2OPT_STANDIN_TOTAL`` bytes (default
24 GiB) all free, and the allocator statistics are 0, so measured VRAM is meaningless under the
stand-in; it checks code paths and numbers (perplexity), not memory.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import types
from collections import Counter
from typing import Any

import torch

#: the only exllamav2 version whose ext signatures and private names this stand-in matches
PINNED_VERSION = "0.3.2"
#: ext calls made, by name (for tests that assert a path was taken)
CALLS: Counter[str] = Counter()
#: visible "GPUs" (all of them the CPU)
N_DEVICES = int(os.environ.get("EXL2OPT_STANDIN_DEVICES", "2"))
TOTAL_BYTES = int(os.environ.get("EXL2OPT_STANDIN_TOTAL", str(24 * 2**30)))

Q_BLOCK = 512  # Q_CACHE_BLOCKSIZE_Q (exllamav2_ext/config.h)


# ----- kernels -----------------------------------------------------------------------------------

def stloader_read(filename: str, offset: int, size: int, target: torch.Tensor) -> None:
    """ext_stloader.cpp: read ``size`` bytes at ``offset`` of ``filename`` into ``target``'s storage."""
    CALLS["stloader_read"] += 1
    buf = target.view(torch.uint8).reshape(-1)
    if buf.numel() != size:
        raise ValueError(f"stloader_read: target holds {buf.numel()} bytes, asked for {size}")
    with open(filename, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"stloader_read: short read from {filename}")
    buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def rms_norm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, epsilon: float) -> None:
    """cuda/rms_norm.cu: y = x * w * rsqrt(mean(x^2) + eps) in fp32; fp16 input clamped to +-65504."""
    CALLS["rms_norm"] += 1
    xf = x.float()
    if x.dtype == torch.float16:
        xf = xf.clamp(-65504.0, 65504.0)
    r = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + epsilon)
    y.copy_((xf * w.float() * r).to(y.dtype))


def softcap_(x: torch.Tensor, scale: float) -> None:
    """cuda/softcap.cu: x = tanh(x / scale) * scale, in place."""
    CALLS["softcap_"] += 1
    x.copy_((torch.tanh(x.float() / scale) * scale).to(x.dtype))


def rope_(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, past_len: int, num_heads: int, head_dim: int,
          offsets: torch.Tensor, neox_style: bool) -> None:
    """cuda/rope.cu, in place on fp16 ``x`` laid out (batch, seq, heads, head_dim).

    Row r of a batch sits at position ``past_len + r // num_heads``. ``offsets`` (int32 per batch, or
    a meta tensor for none): with ``past_len == -1`` the position base is ``max(offsets[b], 0)``,
    otherwise ``past_len + offsets[b]``. Only the first ``sincos_size`` columns rotate (partial
    rotary). NeoX pairs column c with c + sincos_size/2 and uses sin/cos of column c for both; GPT-J
    pairs c with c+1. Math in fp16 as the kernel (``__hmul2``/``__hfma2``).
    """
    CALLS["rope_"] += 1
    bsz = x.shape[0]
    rows = x.numel() // head_dim // bsz
    size = cos.shape[-1]
    sin2, cos2 = sin.reshape(-1, size), cos.reshape(-1, size)
    xv = x.view(bsz, rows, head_dim)
    has_off = offsets is not None and offsets.device.type != "meta"
    for b in range(bsz):
        base = past_len
        if past_len == -1:
            base = max(int(offsets[b]), 0)
        elif has_off:
            base += int(offsets[b])
        pos = (base + torch.arange(rows) // num_heads).clamp(min=0)
        s, c = sin2[pos].float(), cos2[pos].float()
        xb = xv[b].float()
        if neox_style:
            h = size // 2
            left, right = xb[:, :h], xb[:, h:size]
            sl, cl = s[:, :h], c[:, :h]
            # kernel: l' = fma(l, cos, r * -sin), r' = fma(r, cos, l * sin), each product rounded to fp16
            ls = (right * -sl).half().float()
            rs = (left * sl).half().float()
            new_l = (left * cl + ls).half()
            new_r = (right * cl + rs).half()
            xv[b, :, :h] = new_l
            xv[b, :, h:size] = new_r
        else:
            ev, od = xb[:, 0:size:2], xb[:, 1:size:2]
            ce, co = c[:, 0:size:2], c[:, 1:size:2]
            se, so = s[:, 0:size:2], s[:, 1:size:2]
            new_e = ((ev * ce).half().float() + od * -se).half()
            new_o = ((od * co).half().float() + ev * so).half()
            xv[b, :, 0:size:2] = new_e
            xv[b, :, 1:size:2] = new_o


def fp16_to_fp8(in_tensor: torch.Tensor, out_tensor: torch.Tensor, batch_size: int, offset: int, width: int) -> None:
    """cuda/cache.cu ``fp16_to_fp8_kernel``: each byte is the top byte of the fp16 (E5M2 by truncation).

    Tokens ``[offset, offset + width)`` of the first ``batch_size`` rows; the kernel widens the
    element range to multiples of 8 (``min / 8 * 8``).
    """
    CALLS["fp16_to_fp8"] += 1
    a, b = _fp8_span(in_tensor, offset, width)
    src = in_tensor.view(in_tensor.shape[0], -1)[:batch_size, a:b]
    out_tensor.view(out_tensor.shape[0], -1)[:batch_size, a:b] = (src.view(torch.int16) >> 8).to(torch.uint8)


def fp8_to_fp16(in_tensor: torch.Tensor, out_tensor: torch.Tensor, batch_size: int, offset: int, width: int) -> None:
    """cuda/cache.cu ``fp8_to_fp16_kernel``: the byte becomes the top byte of an fp16, low byte 0."""
    CALLS["fp8_to_fp16"] += 1
    a, b = _fp8_span(in_tensor, offset, width)
    src = in_tensor.view(in_tensor.shape[0], -1)[:batch_size, a:b]
    out_tensor.view(out_tensor.shape[0], -1)[:batch_size, a:b] = (src.to(torch.int16) << 8).view(torch.float16)


def _fp8_span(t: torch.Tensor, offset: int, width: int) -> tuple[int, int]:
    tsize = t.shape[2] * t.shape[3]
    lo, hi = offset * tsize, (offset + width) * tsize
    lo = lo // 8 * 8
    hi = lo + (hi - lo + 7) // 8 * 8
    return lo, min(hi, t.shape[1] * tsize)


def _hadamard32(w: torch.Tensor) -> torch.Tensor:
    """The kernel's lane butterfly: ``w`` (..., 32 lanes, 2) fp16; unnormalized Walsh-Hadamard across the
    32 lanes of each of the two interleaved halves, rounding to fp16 after every step (``__hadd2``)."""
    lanes = torch.arange(32)
    for i in (1, 2, 4, 8, 16):
        partner = w[..., lanes ^ i, :]
        bit = ((lanes & i) != 0).view(*([1] * (w.dim() - 2)), 32, 1)
        w = torch.where(bit, (partner.float() - w.float()).half(), (w.float() + partner.float()).half())
    return w


def _quant_block(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cache_q.cuh ``fp16_to_q`` on n blocks of 512 fp16 values: (packed bytes (n, 512*bits/8), scales (n, 16))."""
    n = x.shape[0]
    w = _hadamard32(x.view(n, 8, 32, 2))  # 8 warps x 32 lanes x half2
    flat = w.reshape(n, 16, 32)  # scale groups: lanes 0-15 and 16-31 of each warp = 32 consecutive values
    absmax = flat.abs().amax(dim=-1, keepdim=True)  # fp16
    half_range = 8.0 if bits == 4 else 128.0
    top = 15 if bits == 4 else 255
    norm = (flat.float() / absmax.float()).half()  # __h2div
    q = (norm.float() * half_range + half_range).half().float()  # __hfma2: one rounding
    q = torch.nan_to_num(torch.round(q), nan=0.0).clamp(0, top).to(torch.int32).reshape(n, Q_BLOCK)
    scales = (absmax.float() * (1.0 / half_range)).half().reshape(n, 16)  # __hmul(absmax, 1/8 or 1/128)
    if bits == 4:
        packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    else:
        packed = q.to(torch.uint8)
    return packed, scales


def _dequant_block(packed: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """cache_q.cuh ``q_to_fp16``: (n, bytes) + (n, 16) fp16 scales -> (n, 512) fp16."""
    n = packed.shape[0]
    p = packed.to(torch.int32)
    if bits == 4:
        q = torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(n, Q_BLOCK) - 8
    else:
        q = p - 128
    w = (q.float().half().float().view(n, 16, 32) * scales.float().view(n, 16, 1)).half()  # __hmul2
    w = _hadamard32(w.view(n, 8, 32, 2))
    return (w.float() * (1.0 / 32.0)).half().reshape(n, Q_BLOCK)


def _q_span(t: torch.Tensor, offset: int, width: int) -> tuple[int, int]:
    """ext_cache.cpp: widen [offset, offset + width) tokens until both ends are 512-element aligned."""
    dim = t.shape[2] * t.shape[3]
    if dim % Q_BLOCK:
        while (offset * dim) % Q_BLOCK:
            offset -= 1
        while (width * dim) % Q_BLOCK:
            width += 1
    return offset * dim, (offset + width) * dim


def _check_unpaged(page_size: int, what: str) -> None:
    if page_size:
        raise NotImplementedError(f"exllamav2_ext.{what} with page_size={page_size} (paged attention) is not in the CPU stand-in")


def _bits(wbits: int) -> tuple[int, int]:
    """wbits -> (K bits, V bits): 4 -> 4/4, 6 -> 8/4 (``<8,4>`` kernels), 8 -> 8/8."""
    try:
        return {4: (4, 4), 6: (8, 4), 8: (8, 8)}[wbits]
    except KeyError:
        raise NotImplementedError(f"exllamav2_ext Q cache with wbits={wbits}") from None


def fp16_to_q_kv(k_in: torch.Tensor, k_out: torch.Tensor, k_scales: torch.Tensor, v_in: torch.Tensor,
                 v_out: torch.Tensor, v_scales: torch.Tensor, batch_size: int, offset: int, width: int,
                 page_size: int, cache_seqlens: torch.Tensor, block_table: torch.Tensor, wbits: int) -> None:
    """cuda/cache.cu ``fp16_to_q_kv_kernel`` (non-paged): quantize 512-element blocks of the token range.

    Layout as the kernel's: block at element e stores bytes at ``e * bits / 8`` and 16 fp16 scales
    at ``e / 32``, so the cache tensors keep exllamav2's shapes.
    """
    CALLS["fp16_to_q_kv"] += 1
    _check_unpaged(page_size, "fp16_to_q_kv")
    a, b = _q_span(k_in, offset, width)
    for src, out, sc, bits in ((k_in, k_out, k_scales, _bits(wbits)[0]), (v_in, v_out, v_scales, _bits(wbits)[1])):
        rows = src.view(src.shape[0], -1)[:batch_size, a:b].reshape(-1, Q_BLOCK)
        packed, scales = _quant_block(rows, bits)
        per = 8 // bits if bits < 8 else 1
        out.view(out.shape[0], -1)[:batch_size, a // per:b // per] = packed.reshape(batch_size, -1)
        sc.view(sc.shape[0], -1)[:batch_size, a // 32:b // 32] = scales.reshape(batch_size, -1)


def q_to_fp16_kv(k_in: torch.Tensor, k_out: torch.Tensor, k_scales: torch.Tensor, v_in: torch.Tensor,
                 v_out: torch.Tensor, v_scales: torch.Tensor, batch_size: int, offset: int, width: int,
                 page_size: int, cache_seqlens: torch.Tensor, block_table: torch.Tensor, wbits: int) -> None:
    """cuda/cache.cu ``q_to_fp16_kv_kernel`` (non-paged): the inverse of :func:`fp16_to_q_kv`."""
    CALLS["q_to_fp16_kv"] += 1
    _check_unpaged(page_size, "q_to_fp16_kv")
    a, b = _q_span(k_out, offset, width)
    for src, out, sc, bits in ((k_in, k_out, k_scales, _bits(wbits)[0]), (v_in, v_out, v_scales, _bits(wbits)[1])):
        per = 8 // bits if bits < 8 else 1
        packed = src.view(src.shape[0], -1)[:batch_size, a // per:b // per].reshape(-1, Q_BLOCK // per)
        scales = sc.view(sc.shape[0], -1)[:batch_size, a // 32:b // 32].reshape(-1, 16)
        out.view(out.shape[0], -1)[:batch_size, a:b] = _dequant_block(packed, scales, bits).reshape(batch_size, -1)


IMPLEMENTED = ("stloader_read", "rms_norm", "softcap_", "rope_", "fp16_to_fp8", "fp8_to_fp16",
               "fp16_to_q_kv", "q_to_fp16_kv")


# ----- the module and the patches ----------------------------------------------------------------

class _Ext(types.ModuleType):
    """``exllamav2_ext``: the kernels above; any other attribute fails loudly, by name, when called."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*_a: Any, **_k: Any) -> Any:
            raise NotImplementedError(f"exllamav2_ext.{name} is not implemented by the CPU stand-in "
                                      f"(tests/exl2_ext_standin.py); this path needs the real extension")

        missing.__name__ = name
        return missing


class _Stream:
    def __init__(self, *_a: Any, **_k: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _stub(name: str, result: Any = None) -> Any:
    """A distinct no-op function per name (torch._dynamo keys rules by function object)."""

    def fn(*_a: Any, **_k: Any) -> Any:
        return contextlib.nullcontext() if result == "context" else result

    fn.__name__ = name
    return fn


def _patch_torch_cuda() -> None:
    import torch.nn.attention.bias  # noqa: F401  (builds dynamo's rule map from the real torch.cuda first)

    cuda = torch.cuda
    cuda.is_available = _stub("is_available", True)  # type: ignore[assignment]
    cuda.device_count = _stub("device_count", N_DEVICES)  # type: ignore[assignment]
    cuda.Stream = _Stream  # type: ignore[assignment,misc]
    cuda.stream = _stub("stream", "context")  # type: ignore[assignment]
    cuda.device = _stub("device", "context")  # type: ignore[assignment,misc]
    for name in ("set_device", "set_stream", "synchronize", "empty_cache", "reset_peak_memory_stats", "init"):
        setattr(cuda, name, _stub(name))
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, _stub(name, 0))
    cuda.mem_get_info = _stub("mem_get_info", (TOTAL_BYTES, TOTAL_BYTES))  # type: ignore[assignment]
    cuda.get_device_name = _stub("get_device_name", "CPU stand-in")  # type: ignore[assignment]


class _TorchProxy:
    """``torch`` for ``exllamav2.device``: ``torch.device(int)`` means the CPU (CPU torch refuses an index)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def device(spec: Any = None, *_a: Any) -> torch.device:
        return torch.device("cpu") if isinstance(spec, int) else torch.device(spec)


def _cpu_torch_device(idx: Any = None) -> str:
    return "cpu"


def _safe_move_tensor(tensor: Any, device: Any, non_blocking: bool = False) -> Any:
    if isinstance(tensor, tuple):
        return tuple(_safe_move_tensor(x, device) for x in tensor)
    return tensor if tensor.device.type == "cpu" else tensor.to("cpu")


def _patch_exllamav2() -> None:
    import exllamav2  # noqa: F401  (loads the package with the stand-in ext)

    for name, mod in list(sys.modules.items()):
        if not name.startswith("exllamav2.") or mod is None:
            continue
        if hasattr(mod, "_torch_device"):
            mod._torch_device = _cpu_torch_device
        if hasattr(mod, "safe_move_tensor"):
            mod.safe_move_tensor = _safe_move_tensor
    sys.modules["exllamav2.device"].torch = _TorchProxy()  # type: ignore[attr-defined]


def install() -> None:
    """Install the stand-in and import exllamav2 through it. Call once, first thing, in a subprocess."""
    if "exllamav2" in sys.modules and "exllamav2_ext" not in sys.modules:
        raise RuntimeError("exllamav2 was imported before the CPU stand-in was installed")
    version = importlib.metadata.version("exllamav2")
    if version != PINNED_VERSION:
        raise RuntimeError(f"the CPU stand-in matches exllamav2 {PINNED_VERSION} only, found {version}")
    ext = _Ext("exllamav2_ext")
    ext.__doc__ = "CPU stand-in (tests/exl2_ext_standin.py)"
    for name in IMPLEMENTED:
        setattr(ext, name, globals()[name])
    sys.modules["exllamav2_ext"] = ext
    _patch_torch_cuda()
    _patch_exllamav2()
