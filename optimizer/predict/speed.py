"""Tokens/s from bytes and FLOPs: decode is memory-bound, prompt processing is compute-bound.

Decode (batch 1), per generated token (``/work/shared/reference/prediction.md`` §3.1, §3.5)::

    t = sum_g [ W_g / (eta_w * BW_g) + KV_g * fill / (eta_kv * BW_g) ] + L * tau + (n_gpu - 1) * t_hop

``W_g`` = weight bytes resident on GPU ``g`` (from the VRAM model), ``KV_g`` = cache bytes read per token of
context on that GPU (for exllamav2's quantized caches including the FP16 staging traffic, see
:func:`kv_read_bytes_per_token`), ``tau`` = per-layer host/launch cost (desktop vs server CPU), ``t_hop`` =
one device hand-over. Prompt: ``tok/s = eta_pp * P16 / (2 N + 2 L d n)`` with ``P16`` the dense FP16 tensor rate.
Every parameter has a range; the interval of an :class:`~optimizer.predict.estimate.Estimate` is the model
evaluated at the pessimistic and the optimistic ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from optimizer.predict.estimate import Estimate
from optimizer.predict.gpus import Gpu, find_gpu


@dataclass(frozen=True)
class Range:
    """A fitted value and its plausible range."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class EngineSpeed:
    """Decode/prompt constants of one engine. Efficiencies are fractions of the vendor peak; times in seconds."""

    eta_w: Range
    eta_kv: Range
    tau_desktop: Range
    tau_server: Range
    eta_pp_desktop: Range
    eta_pp_server: Range
    t_hop: float = 0.33e-3


#: exllamav2: eta_w 0.83 (3090 Ti) / 0.93 (4090), tau 46 / 39 us on the exllamav2 README table; server hosts
#: 150-200 us (issues #346, #109); eta_kv 0.4-0.5 (oobabooga 13B, issue #499); eta_pp 0.35-0.6 (§3.4).
EXL2 = EngineSpeed(
    eta_w=Range(0.88, 0.80, 0.95), eta_kv=Range(0.45, 0.35, 0.6),
    tau_desktop=Range(42e-6, 35e-6, 60e-6), tau_server=Range(150e-6, 100e-6, 200e-6),
    eta_pp_desktop=Range(0.5, 0.33, 0.6), eta_pp_server=Range(0.3, 0.13, 0.45),
)
#: exllamav3: as exllamav2 on Ada/Hopper near 4 bpw, much lower on Ampere until calibrated (§3.3).
EXL3 = replace(EXL2, eta_w=Range(0.85, 0.55, 0.95))
#: llama.cpp: two-point fits on XiongjieDai's tg512 table give BW_eff 0.89-0.97, 92-98 us/layer (§3.2).
GGUF = EngineSpeed(
    eta_w=Range(0.93, 0.85, 0.98), eta_kv=Range(0.35, 0.19, 0.5),
    tau_desktop=Range(95e-6, 75e-6, 120e-6), tau_server=Range(150e-6, 100e-6, 200e-6),
    eta_pp_desktop=Range(0.45, 0.33, 0.56), eta_pp_server=Range(0.25, 0.13, 0.35),
)
ENGINES: dict[str, EngineSpeed] = {"exl2": EXL2, "exl3": EXL3, "gguf": GGUF}
#: Extra element bytes per FP16 element of an exllamav2 quantized cache read per step: the quantized cache
#: (bits/16) is dequantized into an FP16 staging buffer (written, then read by attention) (§3.1).
EXL2_CACHE_BITS = {"fp16": None, "fp8": 8.0, "q8": 8.5, "q6": 6.5, "q4": 4.5}
GGUF_CACHE_BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5}


def engine_for(fmt: str) -> EngineSpeed:
    try:
        return ENGINES[fmt.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown format {fmt!r} (choose from {', '.join(ENGINES)})") from None


def kv_read_bytes_per_token(*, fmt: str, cache: str, n_layers: int, kv_dim: int) -> int:
    """Bytes read per generated token per token of filled context (all layers, K and V).

    ``kv_dim`` = KV heads x head dim. exllamav2 FP16: 2 x L x kv_dim x 2 bytes; its quantized caches add the
    dequantization into FP16 staging (read b/16, write and read FP16). llama.cpp reads K and V at their type.
    """
    fp16 = 2 * n_layers * kv_dim * 2
    name = cache.lower()
    if fmt == "exl2" and name in EXL2_CACHE_BITS:
        b = EXL2_CACHE_BITS[name]
        return fp16 if b is None else int(fp16 * (b / 16 + 2))
    if fmt == "gguf":
        halves = name.split("/")
        k, v = (halves[0], halves[0]) if len(halves) == 1 else (halves[0], halves[1])
        if k in GGUF_CACHE_BITS and v in GGUF_CACHE_BITS:
            return int(fp16 / 2 * (GGUF_CACHE_BITS[k] + GGUF_CACHE_BITS[v]) / 16)
    return fp16


@dataclass(frozen=True)
class Calibration:
    """Decode constants measured on this host (from :func:`fit_decode`), replacing the priors."""

    eta_w: float
    tau: float
    eta_kv: float | None = None


def _decode_time(*, gpus: Sequence[Gpu], weight_bytes: Sequence[int], kv_bytes_per_token: Sequence[int], fill: int,
                 n_layers: int, eta_w: float, eta_kv: float, tau: float, t_hop: float) -> float:
    t = sum(w / (eta_w * g.bandwidth) + kv * fill / (eta_kv * g.bandwidth)
            for g, w, kv in zip(gpus, weight_bytes, kv_bytes_per_token, strict=True))
    return t + n_layers * tau + (len(gpus) - 1) * t_hop


def _check(weight_bytes: Sequence[int], kv: Sequence[int], fill: int, n_layers: int) -> None:
    if any(w < 0 for w in weight_bytes) or any(k < 0 for k in kv) or fill < 0 or n_layers < 1:
        raise ValueError("weight bytes, KV bytes and fill must be >= 0 and n_layers >= 1")
    if len(weight_bytes) != len(kv) or not weight_bytes:
        raise ValueError("one weight-bytes and one KV-bytes value per GPU")


def split_decode_speed(gpus: Sequence[str], weight_bytes: Sequence[int], kv_bytes_per_token: Sequence[int], fill: int,
                       n_layers: int, fmt: str = "exl2", calibration: Calibration | None = None) -> Estimate:
    """Generated tokens/s at batch 1 for a layer split: per-device times add up, plus one hop per extra GPU.

    ``gpus`` names one GPU per device (a single name is used for every device); ``weight_bytes`` and
    ``kv_bytes_per_token`` are per device, in bytes; ``fill`` = tokens already in the cache.
    """
    _check(weight_bytes, kv_bytes_per_token, fill, n_layers)
    names = list(gpus) * len(weight_bytes) if len(gpus) == 1 else list(gpus)
    if len(names) != len(weight_bytes):
        raise ValueError("one GPU name per device")
    devs = [find_gpu(n) for n in names]
    e = engine_for(fmt)
    server = any(g.host == "server" for g in devs)
    tau = e.tau_server if server else e.tau_desktop
    args = dict(gpus=devs, weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes_per_token, fill=fill, n_layers=n_layers)
    if calibration is not None:
        eta_kv = calibration.eta_kv or e.eta_kv.value
        t = _decode_time(**args, eta_w=calibration.eta_w, eta_kv=eta_kv, tau=calibration.tau, t_hop=e.t_hop)  # type: ignore[arg-type]
        return Estimate(1 / t, 1 / (t * 1.07), 1 / (t * 0.95))
    mid = _decode_time(**args, eta_w=e.eta_w.value, eta_kv=e.eta_kv.value, tau=tau.value, t_hop=e.t_hop)  # type: ignore[arg-type]
    slow = _decode_time(**args, eta_w=e.eta_w.low, eta_kv=e.eta_kv.low, tau=tau.high, t_hop=e.t_hop * 1.5)  # type: ignore[arg-type]
    fast = _decode_time(**args, eta_w=e.eta_w.high, eta_kv=e.eta_kv.high, tau=tau.low, t_hop=e.t_hop * 0.7)  # type: ignore[arg-type]
    return Estimate(1 / mid, 1 / slow, 1 / fast)


def decode_speed(gpu: str, weight_bytes: int, kv_bytes_per_token: int, fill: int, n_layers: int,
                 fmt: str = "exl2") -> Estimate:
    """Generated tokens/s at batch 1 with the engine of ``fmt`` (exllamav2, exllamav3 or llama.cpp).

    Args:
        gpu: a GPU name (matched forgivingly, see :func:`optimizer.predict.gpus.find_gpu`).
        weight_bytes: bytes of weights resident on the GPU and read once per token.
        kv_bytes_per_token: cache bytes read per token of filled context (:func:`kv_read_bytes_per_token`).
        fill: tokens already in the cache.
        n_layers: decoder layers (each costs a fixed host/launch time).
        fmt: ``exl2``, ``exl3`` or ``gguf``.
    """
    return split_decode_speed([gpu], [weight_bytes], [kv_bytes_per_token], fill, n_layers, fmt)


def prompt_speed(gpu: str, matmul_params: int, n_layers: int, hidden_size: int, prompt_tokens: int,
                 fmt: str = "exl2") -> Estimate | None:
    """Prompt tokens/s for a prompt of ``prompt_tokens`` (FLOPs: 2 N per token + 2 L d n for attention).

    ``matmul_params`` = weights multiplied per token (decoder linears and the head). None when the GPU's
    FP16 tensor rate is not in the table.
    """
    if matmul_params < 1 or n_layers < 1 or hidden_size < 1 or prompt_tokens < 1:
        raise ValueError("params, layers, hidden size and prompt tokens must be positive")
    g = find_gpu(gpu)
    if g.fp16_tflops is None:
        return None
    e = engine_for(fmt)
    eta = e.eta_pp_server if g.host == "server" else e.eta_pp_desktop
    flops_per_token = 2 * matmul_params + 2 * n_layers * hidden_size * prompt_tokens
    peak = g.fp16_tflops * 1e12
    return Estimate(eta.value * peak / flops_per_token, eta.low * peak / flops_per_token, eta.high * peak / flops_per_token)


@dataclass(frozen=True)
class SpeedPoint:
    """One measured decode speed: ``bandwidth`` bytes/s of the GPU, weight bytes read per token, cache bytes read
    per token at the measured fill (``kv_bytes``, i.e. per-token KV bytes x fill), decoder layers, tokens/s."""

    bandwidth: float
    weight_bytes: int
    kv_bytes: int
    n_layers: int
    tok_s: float


def fit_decode(points: Sequence[SpeedPoint], *, fmt: str = "exl2", server: bool = False) -> Calibration:
    """Fit ``t = W / (eta_w * BW) + L * tau`` (KV term at the prior ``eta_kv``) to measured points.

    Points with two or more distinct ``W / BW`` fix both constants (least squares, no intercept); otherwise the
    prior per-layer ``tau`` is kept and ``eta_w`` is fitted. Results are clamped to eta_w in (0.2, 1], tau >= 0.
    """
    if not points:
        raise ValueError("no points to fit")
    e = engine_for(fmt)
    prior_tau = (e.tau_server if server else e.tau_desktop).value
    x1 = [p.weight_bytes / p.bandwidth for p in points]
    x2 = [float(p.n_layers) for p in points]
    y = [1 / p.tok_s - p.kv_bytes / (e.eta_kv.value * p.bandwidth) for p in points]
    s11 = sum(a * a for a in x1)
    s22 = sum(b * b for b in x2)
    s12 = sum(a * b for a, b in zip(x1, x2, strict=True))
    s1y = sum(a * c for a, c in zip(x1, y, strict=True))
    s2y = sum(b * c for b, c in zip(x2, y, strict=True))
    det = s11 * s22 - s12 * s12
    spread = max(x1) - min(x1)
    if len(points) >= 2 and spread > 0.05 * max(x1) and det > 1e-12 * s11 * s22:
        inv_eta = (s1y * s22 - s2y * s12) / det
        tau = (s11 * s2y - s12 * s1y) / det
        if inv_eta > 0 and tau >= 0:
            return Calibration(eta_w=min(max(1 / inv_eta, 0.2), 1.0), tau=tau)
    # one size only: keep the prior tau, fit eta_w
    rest = sum(c - prior_tau * b for b, c in zip(x2, y, strict=True))
    inv_eta = rest / sum(x1) if sum(x1) > 0 else 1 / e.eta_w.value
    eta = min(max(1 / inv_eta, 0.2), 1.0) if inv_eta > 0 else 1.0
    return Calibration(eta_w=eta, tau=prior_tau)
