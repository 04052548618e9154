"""The predicted Pareto front of a search space, written like a study's reports (``search --predict-only``):
``trials.csv`` (every configuration), ``pareto.csv`` (the predicted front) and ``pareto_predicted.png``, each row
with ``source`` = ``predicted`` and the intervals. No GPU, no download, no Optuna study.

Perplexity here is the ratio to the FP16 model with an FP16 cache (no measurement anchors it yet).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimizer.predict.configs import shown_fill
from optimizer.predict.refit import SpaceEntry, SpacePredictor
from optimizer.schedule import Point, pareto

COLUMNS = ("source", "config_key", "format", "variant", "label", "bits", "head_bits", "cache", "max_seq_len", "split",
           "fits", "reason", "ppl_vs_fp16", "ppl_vs_fp16_low", "ppl_vs_fp16_high", "gen_tok_s", "gen_tok_s_low",
           "gen_tok_s_high", "context_fill", "gpu", "download")


def predicted_rows(entries: Sequence[SpaceEntry], *, gpus: Sequence[str], fill: int) -> list[dict[str, Any]]:
    """One row per configuration: predictions for the fitting ones, the VRAM verdict's reason for the others."""
    fitting = [e for e in entries if e.verdict.fits]
    preds = SpacePredictor(fitting, gpus=gpus, fill=fill).refit() if fitting else {}
    rows = []
    for e in entries:
        v = e.config.variant
        row: dict[str, Any] = {
            "source": "predicted", "config_key": e.key, "format": v.format, "variant": v.source, "label": v.label,
            "bits": v.bits, "head_bits": v.head_bits, "cache": e.config.cache, "max_seq_len": e.config.max_seq_len,
            "split": e.config.split.label, "fits": e.verdict.fits, "reason": e.verdict.reason,
            "gpu": " + ".join(gpus), "download": v.location.download_command(),
        }
        if e.key in preds:
            ppl, tps = preds[e.key]
            row.update(ppl_vs_fp16=round(ppl.value, 5), ppl_vs_fp16_low=round(ppl.low, 5),
                       ppl_vs_fp16_high=round(ppl.high, 5), context_fill=max(min(fill, e.config.max_seq_len - 128), 1)
                       if fill else shown_fill(e.config.max_seq_len))
            if gpus:
                row.update(gen_tok_s=round(tps.value, 2), gen_tok_s_low=round(tps.low, 2), gen_tok_s_high=round(tps.high, 2))
        rows.append(row)
    return rows


def front_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The predicted front (perplexity down, tok/s up, context up); without a GPU, tok/s counts as equal."""
    pts = {r["config_key"]: Point(r["ppl_vs_fp16"], r.get("gen_tok_s") or 0.0, int(r["max_seq_len"]))
           for r in rows if r.get("ppl_vs_fp16") is not None}
    keep = pareto(pts)
    return sorted((r for r in rows if r["config_key"] in keep), key=lambda r: (r["ppl_vs_fp16"], -(r.get("gen_tok_s") or 0)))


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def plot(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Predicted perplexity change against tok/s (or context without a GPU), intervals as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    speed = any(r.get("gen_tok_s") is not None for r in rows)
    for group, style in ((rows, dict(color="0.7", label="predicted")), (front, dict(color="C0", label="predicted front"))):
        pts = [r for r in group if r.get("ppl_vs_fp16") is not None]
        if not pts:
            continue
        x = [r["gen_tok_s"] if speed else r["max_seq_len"] for r in pts]
        y = [(r["ppl_vs_fp16"] - 1) * 100 for r in pts]
        yerr = [[(r["ppl_vs_fp16"] - r["ppl_vs_fp16_low"]) * 100 for r in pts],
                [(r["ppl_vs_fp16_high"] - r["ppl_vs_fp16"]) * 100 for r in pts]]
        xerr = ([[r["gen_tok_s"] - r["gen_tok_s_low"] for r in pts], [r["gen_tok_s_high"] - r["gen_tok_s"] for r in pts]]
                if speed else None)
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt="o", capsize=2, **style)  # type: ignore[arg-type]
    ax.set_xlabel("predicted generation tok/s" if speed else "context (tokens)")
    ax.set_ylabel("predicted perplexity change vs FP16 (%)")
    ax.set_title("Predicted front (no measurement)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_predicted(entries: Sequence[SpaceEntry], *, out_dir: Path, gpus: Sequence[str], fill: int,
                    plots: bool = True) -> tuple[list[Path], list[dict[str, Any]]]:
    """Write trials.csv, pareto.csv and the plot under ``out_dir``; returns the files and the front rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = predicted_rows(entries, gpus=gpus, fill=fill)
    front = front_rows(rows)
    files = [out_dir / "trials.csv", out_dir / "pareto.csv"]
    files[0].write_text(to_csv(rows))
    files[1].write_text(to_csv(front))
    if plots:
        p = plot(rows, front, out_dir / "pareto_predicted.png")
        if p is not None:
            files.append(p)
    return files, front
