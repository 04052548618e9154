"""Reports of a study: pareto.csv, trials.csv, pareto.png, pareto.html and a terminal recommendation.

Everything is rebuilt from the study storage alone (trial user attributes plus the study's
``variants`` user attribute), so ``exl2opt report STUDY`` works without the original sources.

The Pareto front: measured, feasible (``vram_excess_gib <= 0``) configurations, one row per
configuration, not dominated on (perplexity lower, generation tokens/s higher, max_seq_len higher).

Open the study interactively with optuna-dashboard (``pip install optuna-dashboard``)::

    optuna-dashboard studies/<study>/journal.log          # the default journal storage
    optuna-dashboard sqlite:///path/to/db.sqlite3         # or the URL given to --storage

optuna-dashboard does not read ``set_constraint`` constraints; infeasible configurations carry
dominated placeholder values (perplexity 1e4, 0 tokens/s, context 0) so they never look optimal there.

No report ever contains a Hub token: locations never hold one, and every text cell is scrubbed
of anything shaped like a token (``hf_...``) and of the value of ``HF_TOKEN`` as a second guard.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizer.vram import GIB

CONSTRAINT = "vram_excess_gib"

PARETO_COLUMNS = (
    "variant", "format", "label", "bpw", "head_bits", "max_seq_len", "cache_mode", "split",
    "perplexity", "gen_tok_s", "prompt_tok_s", "predicted_vram_gib", "measured_vram_gib",
    "measured_used_gib", "budget_gib", "download", "trial",
)
TRIAL_COLUMNS = (
    "trial", "state", "status", "reason", "variant", "format", "label", "bpw", "head_bits", "max_seq_len",
    "cache_mode", "split", "perplexity", "gen_tok_s", "prompt_tok_s", "context_fill", "vram_excess_gib",
    "predicted_vram_gib", "measured_vram_gib", "measured_used_gib", "budget_gib", "model_loaded",
    "duplicate_of", "duration_s", "config_key",
)

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


@dataclass(frozen=True)
class ReportFiles:
    """Paths written by :func:`write_reports` (plots None when they could not be drawn)."""

    pareto_csv: Path
    trials_csv: Path
    png: Path | None
    html: Path | None
    comparison: str = ""

    @property
    def written(self) -> tuple[Path, ...]:
        """Every file written, in the order above."""
        return tuple(p for p in (self.pareto_csv, self.trials_csv, self.png, self.html) if p is not None)


def scrub(text: str) -> str:
    """Remove anything that looks like a Hub token."""
    out = _TOKEN_RE.sub("hf_***", text)
    for env in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        tok = os.environ.get(env)
        if tok and len(tok) >= 8:
            out = out.replace(tok, "***")
    return out


def _gib_list(devs: Sequence[dict[str, Any]] | None, key: str) -> str:
    if not devs:
        return ""
    return ";".join(f"{d[key] / GIB:.3f}" for d in devs if key in d)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per trial (every state), with the columns of :data:`TRIAL_COLUMNS`."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        pred = ua.get("predicted")
        rows.append({
            "trial": t.number, "state": t.state.name, "status": ua.get("status", ""), "reason": ua.get("reason", ""),
            "variant": ua.get("source", ua.get("variant", "")), "format": ua.get("format", ""),
            "label": ua.get("label", ""), "bpw": ua.get("bits"), "head_bits": ua.get("head_bits"),
            "max_seq_len": ua.get("max_seq_len", t.params.get("max_seq_len")),
            "cache_mode": ua.get("cache", t.params.get("cache")), "split": ua.get("split", ""),
            "perplexity": ua.get("perplexity"), "gen_tok_s": ua.get("gen_tok_s"),
            "prompt_tok_s": ua.get("prompt_tok_s"), "context_fill": ua.get("context_fill"),
            "vram_excess_gib": t.constraints.get(CONSTRAINT) if hasattr(t, "constraints") else None,
            "predicted_vram_gib": _gib_list(pred, "total"), "measured_vram_gib": _gib_list(ua.get("measured"), "peak_allocated"),
            "measured_used_gib": _gib_list(ua.get("measured"), "used"), "budget_gib": _gib_list(pred, "budget"),
            "model_loaded": ua.get("model_loaded"), "duplicate_of": ua.get("duplicate_of", ""),
            "duration_s": round(dur, 3) if dur is not None else None, "config_key": ua.get("config_key", ""),
        })
    return rows


def _dominates(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    return a[0] <= b[0] and a[1] >= b[1] and a[2] >= b[2] and a != b


def pareto_rows(rows: Sequence[dict[str, Any]], variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Non-dominated measured feasible configurations, one row each, best perplexity first."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["state"] != "COMPLETE" or r["status"] != "measured":
            continue
        if r["vram_excess_gib"] is not None and r["vram_excess_gib"] > 0:
            continue
        best.setdefault(r["config_key"], r)
    pts = {k: (float(r["perplexity"]), float(r["gen_tok_s"]), float(r["max_seq_len"])) for k, r in best.items()}
    front = [k for k, p in pts.items() if not any(_dominates(q, p) for k2, q in pts.items() if k2 != k)]
    out = []
    for k in front:
        r = best[k]
        vkey = k.split("|")[0]
        out.append({
            **{c: r.get(c) for c in PARETO_COLUMNS if c in r},
            "download": variants.get(vkey, {}).get("download", ""),
        })
    out.sort(key=lambda r: (r["perplexity"], -r["gen_tok_s"], -r["max_seq_len"]))
    return out


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: scrub(str(r.get(c))) if isinstance(r.get(c), str) else r.get(c) for c in columns})
    return buf.getvalue()


def recommendation(pareto: Sequence[dict[str, Any]]) -> str:
    """A few lines for the terminal: best quality, fastest, longest context, and a balanced pick."""
    if not pareto:
        return "No measured configuration fits the budget; try a larger --vram, smaller contexts or quantized caches."

    def line(tag: str, r: dict[str, Any]) -> str:
        return (f"{tag:<16} {r['label']} ({r['format']}) cache {r['cache_mode']}, ctx {r['max_seq_len']}, split {r['split']}: "
                f"ppl {r['perplexity']:.3f}, {r['gen_tok_s']:.1f} tok/s gen")

    by_ppl = min(pareto, key=lambda r: (r["perplexity"], -r["gen_tok_s"]))
    by_speed = max(pareto, key=lambda r: (r["gen_tok_s"], -r["perplexity"]))
    by_ctx = max(pareto, key=lambda r: (r["max_seq_len"], -r["perplexity"]))
    p = [r["perplexity"] for r in pareto]
    g = [r["gen_tok_s"] for r in pareto]
    c = [r["max_seq_len"] for r in pareto]

    def norm(x: float, lo: float, hi: float) -> float:
        return 0.0 if hi == lo else (x - lo) / (hi - lo)

    balanced = min(pareto, key=lambda r: norm(r["perplexity"], min(p), max(p)) ** 2
                   + (1 - norm(r["gen_tok_s"], min(g), max(g))) ** 2 + (1 - norm(r["max_seq_len"], min(c), max(c))) ** 2)
    lines = [f"Pareto front: {len(pareto)} configuration(s).", line("best quality:", by_ppl), line("fastest:", by_speed),
             line("longest context:", by_ctx), line("balanced:", balanced)]
    if balanced.get("download"):
        lines.append(f"get it:           {balanced['download']}")
    return scrub("\n".join(lines))


def write_reports(*, study: Any, out_dir: Path, plots: bool = True) -> tuple[ReportFiles, list[dict[str, Any]]]:
    """Write the CSVs (and plots) for ``study`` into ``out_dir``; returns the files and the Pareto rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    variants = study.user_attrs.get("variants", {}) or {}
    front = pareto_rows(rows, variants)
    pareto_csv, trials_csv = out_dir / "pareto.csv", out_dir / "trials.csv"
    pareto_csv.write_text(to_csv(front, PARETO_COLUMNS))
    trials_csv.write_text(to_csv(rows, TRIAL_COLUMNS))
    png = html = None
    if plots:
        png = _plot_png(rows, front, out_dir / "pareto.png")
        html = _plot_html(rows, front, out_dir / "pareto.html")
    files = ReportFiles(pareto_csv=pareto_csv, trials_csv=trials_csv, png=png, html=html,
                        comparison=compare_formats(rows, front))
    return files, front


def compare_formats(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]]) -> str:
    """When a study measured more than one format (e.g. exl2 and GGUF quants of one model), a few lines
    comparing them: configurations measured, on the front, best perplexity and fastest generation.
    Empty for a single-format study."""
    measured = [r for r in _measured(rows) if _feasible(r)]
    formats = sorted({str(r["format"]) for r in measured})
    if len(formats) < 2:
        return ""
    lines = ["By format (measured configurations within the budget):"]
    for fmt in formats:
        rs = [r for r in measured if r["format"] == fmt]
        best = min(rs, key=lambda r: r["perplexity"])
        fast = max(rs, key=lambda r: r["gen_tok_s"])
        n_front = sum(1 for r in front if r["format"] == fmt)
        lines.append(f"  {fmt:<5} {len(rs)} measured, {n_front} on the front; best ppl {best['perplexity']:.3f} "
                     f"({best['label']} {best['cache_mode']}), fastest {fast['gen_tok_s']:.1f} tok/s "
                     f"({fast['label']} {fast['cache_mode']})")
    return scrub("\n".join(lines))


def _feasible(r: dict[str, Any]) -> bool:
    v = r.get(CONSTRAINT)
    return v is None or float(v) <= 0


def _measured(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["state"] == "COMPLETE" and r["status"] == "measured":
            seen.setdefault(r["config_key"], r)
    return list(seen.values())


def _plot_png(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # configurations of one (variant, cache) share perplexity and speed across contexts: draw the
    # largest context last so the point shows the best one
    pts = sorted(_measured(rows), key=lambda r: r["max_seq_len"])
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    if pts:
        sc = ax.scatter([r["gen_tok_s"] for r in pts], [r["perplexity"] for r in pts], c=[r["max_seq_len"] for r in pts],
                        cmap="viridis", s=28, alpha=0.6, label="measured")
        fig.colorbar(sc, ax=ax, label="max_seq_len (tokens)")
    if front:
        ax.scatter([r["gen_tok_s"] for r in front], [r["perplexity"] for r in front], facecolors="none",
                   edgecolors="red", s=90, linewidths=1.5, label="Pareto front")
        for r in front:
            ax.annotate(f"{r['label']} {r['cache_mode']} {r['max_seq_len']}", (r["gen_tok_s"], r["perplexity"]),
                        fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("generation tokens/s (higher is better)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("exl2opt: measured configurations within the VRAM budget")
    ax.grid(alpha=0.3)
    if pts or front:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no measured configuration", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_html(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], path: Path) -> Path | None:
    try:
        import plotly.graph_objects as go
    except ImportError:
        return None
    pts = _measured(rows)
    fkeys = {(r["label"], r["cache_mode"], r["max_seq_len"], r["split"]) for r in front}

    def hover(r: dict[str, Any]) -> str:
        return (f"{scrub(str(r['variant']))}<br>{r['label']} cache {r['cache_mode']} ctx {r['max_seq_len']} split {r['split']}"
                f"<br>ppl {r['perplexity']:.4f}, gen {r['gen_tok_s']:.1f} tok/s, prompt {r['prompt_tok_s']:.0f} tok/s"
                f"<br>VRAM predicted {r['predicted_vram_gib']} GiB, measured {r['measured_vram_gib']} GiB")

    fig = go.Figure()
    for name, sel, size in (("measured", [r for r in pts if (r["label"], r["cache_mode"], r["max_seq_len"], r["split"]) not in fkeys], 8),
                            ("Pareto front", [r for r in pts if (r["label"], r["cache_mode"], r["max_seq_len"], r["split"]) in fkeys], 13)):
        fig.add_trace(go.Scatter(
            x=[r["gen_tok_s"] for r in sel], y=[r["perplexity"] for r in sel], mode="markers", name=name,
            marker={"size": size, "color": [r["max_seq_len"] for r in sel], "colorscale": "Viridis", "showscale": name == "measured",
                    "line": {"width": 2 if name == "Pareto front" else 0, "color": "red"}},
            text=[hover(r) for r in sel], hoverinfo="text",
        ))
    fig.update_layout(title="exl2opt Pareto front", xaxis_title="generation tokens/s", yaxis_title="perplexity")
    fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    return path
