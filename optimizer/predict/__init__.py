"""Predicted perplexity and tokens/s of quantized variants, from metadata alone (pure Python, no torch/optuna).

Public API (stable names; see ``docs/prediction.md`` for the models, their data and their measured accuracy)::

    from optimizer.predict import Estimate, quality, decode_speed

    quality("exl2", [3.0, 4.0, 5.0])                    # ratios ppl / ppl_fp16, with intervals
    quality("exl2", [3.5, 4.5], anchors=[(3.0, 9.995), (8.0, 7.645)])   # perplexity, fixed by 2 measurements
    decode_speed("RTX 4090", weight_bytes=3_342_000_000, kv_bytes_per_token=0, fill=0, n_layers=32)

* :func:`quality` -- a per-format curve of ``ln(ppl/ppl_ref)`` against exact bits per weight; measured
  ``(bits, ppl)`` anchors of the same model fix its own constants.
* :func:`cache_penalty` -- the added ``ln(ppl)`` of a KV-cache precision.
* :func:`decode_speed` / :func:`split_decode_speed` -- generated tokens/s: bytes read per token over bandwidth x
  a fitted efficiency, plus a per-layer cost; a layer split adds per-device times.
* :func:`prompt_speed` -- prompt tokens/s from FLOPs.
* :func:`find_gpu` / :func:`known_gpus` / :func:`detect_gpu_names` -- the GPU table and ``--gpu`` matching.
"""

from optimizer.predict.estimate import Estimate
from optimizer.predict.gpus import Gpu, detect_gpu_names, find_gpu, known_gpus
from optimizer.predict.quality import CURVES, QualityFit, cache_penalty, fit, quality
from optimizer.predict.speed import (
    Calibration,
    SpeedPoint,
    decode_speed,
    fit_decode,
    kv_read_bytes_per_token,
    prompt_speed,
    split_decode_speed,
)

__all__ = [
    "CURVES",
    "Calibration",
    "Estimate",
    "Gpu",
    "QualityFit",
    "SpeedPoint",
    "cache_penalty",
    "decode_speed",
    "detect_gpu_names",
    "find_gpu",
    "fit",
    "fit_decode",
    "known_gpus",
    "kv_read_bytes_per_token",
    "prompt_speed",
    "quality",
    "split_decode_speed",
]
