"""Predictions for exl2opt's own objects: a variant's exact bits (from its tensor headers) and a configuration's
perplexity change and tokens/s given its VRAM verdict (weights and cache bytes per GPU).

Still pure Python: variants, configurations and verdicts are plain dataclasses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from optimizer.predict.estimate import Estimate
from optimizer.predict.quality import CURVES, QualityFit, cache_penalty, fit
from optimizer.predict.speed import EXL2_CACHE_BITS, Calibration, split_decode_speed
from optimizer.variant import TensorInfo, Variant
from optimizer.vram import VramVerdict

_LAYER = re.compile(r"(?:^|\.)(?:layers|blk|h)\.(\d+)\.")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|output)(?:\.|$)")
#: exl2's ``-hb 6`` head as the engine reads it (bits per weight incl. scales): the curves' reference head.
REFERENCE_HEAD_BITS = 6.33
#: Speed fill the tables show: the search's default speed protocol (cache filled to 2048 tokens, 128 generated).
SHOWN_FILL, GEN_TOKENS = 2048, 128


@dataclass(frozen=True)
class VariantBits:
    """Exact bits per weight from the stored tensors: decoder layers, head (None if not stored), and the element
    counts behind them (the head's share matters for small models)."""

    decoder_bits: float
    head_bits: float | None
    decoder_params: int
    head_params: int
    n_layers: int


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 0


def _linear_groups(tensors: Sequence[TensorInfo]) -> tuple[dict[str, int], dict[str, int]]:
    """Bytes and element counts per tensor group; an exl2 linear (``X.q_weight`` ...) counts K x N elements once."""
    nbytes: dict[str, int] = {}
    numel: dict[str, int] = {}
    by_name = {t.name: t for t in tensors}
    for t in tensors:
        stem, _, leaf = t.name.rpartition(".")
        if leaf.startswith("q_") and f"{stem}.q_weight" in by_name:
            nbytes[stem] = nbytes.get(stem, 0) + t.nbytes
            if leaf == "q_weight":
                inv = by_name.get(f"{stem}.q_invperm")
                k = inv.shape[0] if inv is not None and inv.shape else 0
                numel[stem] = k * (t.shape[1] if len(t.shape) > 1 else 0)
        else:
            nbytes[t.name] = t.nbytes
            numel[t.name] = _numel(t.shape)
    return nbytes, numel


def variant_bits(variant: Variant) -> VariantBits | None:
    """Exact decoder and head bits per weight of ``variant`` from its tensor table (None without decoder tensors)."""
    nbytes, numel = _linear_groups(variant.tensors)
    dec_b = dec_n = head_b = head_n = 0
    layers: set[int] = set()
    for name, b in nbytes.items():
        n = numel.get(name, 0)
        m = _LAYER.search(name)
        if m:
            layers.add(int(m.group(1)))
            dec_b, dec_n = dec_b + b, dec_n + n
        elif _HEAD.search(name) and "norm" not in name:
            head_b, head_n = head_b + b, head_n + n
    if dec_n <= 0:
        return None
    return VariantBits(decoder_bits=8 * dec_b / dec_n, head_bits=8 * head_b / head_n if head_n else None,
                       decoder_params=dec_n, head_params=head_n, n_layers=len(layers))


def effective_bits(fmt: str, vb: VariantBits) -> float:
    """The decoder bits at which the format curve gives the same loss as this decoder + head (exl2/exl3 heads are
    compared with the curves' reference ``-hb 6`` head, weighted by the head's share of the weights)."""
    if fmt not in ("exl2", "exl3") or vb.head_bits is None or vb.head_params <= 0:
        return vb.decoder_bits
    cv = CURVES[fmt]
    share = vb.head_params / (vb.head_params + vb.decoder_params)

    def d(b: float) -> float:
        return math.exp(-cv.c * (b - cv.beta))

    total = d(vb.decoder_bits) + share * (d(vb.head_bits) - d(REFERENCE_HEAD_BITS))
    return cv.beta - math.log(total) / cv.c if total > 0 else vb.decoder_bits


@dataclass(frozen=True)
class ConfigPrediction:
    """Predicted quality and speed of one configuration.

    ``ppl``: perplexity when ``absolute`` (anchored on measurements), else the ratio to the FP16 model with an
    FP16 cache. ``decode_tok_s`` at ``fill`` tokens of context (None without a GPU), ``bits`` the effective bits.
    """

    ppl: Estimate
    absolute: bool
    decode_tok_s: Estimate | None
    fill: int
    bits: float | None

    @property
    def ppl_change_pct(self) -> float | None:
        """Predicted perplexity change against FP16 weights and cache, in percent (None once absolute)."""
        return None if self.absolute else (self.ppl.value - 1) * 100


def shown_fill(max_seq_len: int) -> int:
    """The fill the search's default speed protocol measures at (tokens)."""
    return max(min(SHOWN_FILL, max_seq_len - GEN_TOKENS), 1)


def predict_quality(variant: Variant, cache: str, qfit: QualityFit | None = None,
                    penalty: Estimate | None = None) -> tuple[Estimate, bool, float | None]:
    """Predicted ppl (or ratio) of ``variant`` with ``cache``: weight curve x cache penalty (``penalty`` in added
    ln-perplexity overrides the prior, e.g. once measured)."""
    fmt = variant.format if variant.format in CURVES else "exl2"
    vb = variant_bits(variant)
    b = effective_bits(fmt, vb) if vb else variant.bits
    if b is None or not 0.5 <= b <= 32:
        return Estimate(1.0, 1.0, 2.0), False, None
    f = qfit or fit(fmt, ())
    w = f.predict(b)
    c = penalty or cache_penalty(variant.format, cache)
    return Estimate(w.value * math.exp(c.value), w.low * math.exp(c.low), w.high * math.exp(c.high)), f.absolute, b


def kv_read_factor(fmt: str, cache: str) -> float:
    """Bytes read per stored cache byte per step (exllamav2 dequantizes a quantized cache into FP16 staging)."""
    b = EXL2_CACHE_BITS.get(cache.lower()) if fmt == "exl2" else None
    return 1.0 if b is None else 1.0 + 32.0 / b


def predict_decode(verdict: VramVerdict, *, fmt: str, cache: str, max_seq_len: int, n_layers: int, gpus: Sequence[str],
                   fill: int, calibration: Calibration | None = None) -> Estimate | None:
    """Decode tok/s from the verdict's per-GPU weight and cache bytes (None when the verdict has no devices)."""
    devs = [d for d in verdict.devices if d.weights > 0 or d.cache > 0]
    if not devs or n_layers < 1:
        return None
    factor = kv_read_factor(fmt, cache)
    kv = [int(d.cache / max(max_seq_len, 1) * factor) for d in devs]
    names = [gpus[min(d.index, len(gpus) - 1)] for d in devs]  # one name for all, or one per device
    speed_fmt = fmt if fmt in ("exl2", "exl3", "gguf") else "exl2"
    return split_decode_speed(names, [d.weights for d in devs], kv, fill, n_layers, speed_fmt, calibration)


def predict_config(variant: Variant, *, cache: str, max_seq_len: int, verdict: VramVerdict | None, gpus: Sequence[str] = (),
                   qfit: QualityFit | None = None, calibration: Calibration | None = None,
                   fill: int | None = None) -> ConfigPrediction:
    """Quality and (with ``gpus`` and a fitting verdict) decode speed of one configuration."""
    ppl, absolute, b = predict_quality(variant, cache, qfit)
    f = shown_fill(max_seq_len) if fill is None else fill
    speed = None
    if gpus and verdict is not None and verdict.fits:
        vb = variant_bits(variant)
        n_layers = vb.n_layers if vb else 0
        speed = predict_decode(verdict, fmt=variant.format, cache=cache, max_seq_len=max_seq_len, n_layers=n_layers,
                               gpus=gpus, fill=f, calibration=calibration)
    return ConfigPrediction(ppl=ppl, absolute=absolute, decode_tok_s=speed, fill=f, bits=b)


def params_b(variant: Variant) -> float | None:
    """Decoder + head parameters in billions, from the tensor table."""
    vb = variant_bits(variant)
    return (vb.decoder_params + vb.head_params) / 1e9 if vb else None


def summary_columns(p: ConfigPrediction) -> Mapping[str, object]:
    """Flat CSV/JSON columns of a prediction."""
    out: dict[str, object] = {
        "pred_bits": round(p.bits, 3) if p.bits is not None else None,
        "pred_ppl_change_pct": round((p.ppl.value - 1) * 100, 2) if not p.absolute else None,
        "pred_ppl_change_low_pct": round((p.ppl.low - 1) * 100, 2) if not p.absolute else None,
        "pred_ppl_change_high_pct": round((p.ppl.high - 1) * 100, 2) if not p.absolute else None,
    }
    if p.decode_tok_s is not None:
        out.update({"pred_gen_tok_s": round(p.decode_tok_s.value, 1), "pred_gen_tok_s_low": round(p.decode_tok_s.low, 1),
                    "pred_gen_tok_s_high": round(p.decode_tok_s.high, 1), "pred_fill": p.fill})
    return out
