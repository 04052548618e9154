"""Terminal text of a report: the recommendation (best quality, fastest, longest context, balanced)
and, for a study of several formats, a comparison by format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optimizer.report.rows import feasible, measured, scrub

NOTHING_FITS = "No measured configuration fits the budget; try a larger --vram, smaller contexts or quantized caches."


def picks(pareto: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The recommended rows of a front: ``best quality``, ``fastest``, ``longest context``, ``balanced``
    (closest to the ideal corner after scaling each objective to 0..1 over the front). Empty front: {}."""
    if not pareto:
        return {}
    p = [float(r["perplexity"]) for r in pareto]
    g = [float(r["gen_tok_s"]) for r in pareto]
    c = [float(r["max_seq_len"]) for r in pareto]

    def norm(x: float, lo: float, hi: float) -> float:
        return 0.0 if hi == lo else (x - lo) / (hi - lo)

    return {
        "best quality": min(pareto, key=lambda r: (r["perplexity"], -r["gen_tok_s"])),
        "fastest": max(pareto, key=lambda r: (r["gen_tok_s"], -r["perplexity"])),
        "longest context": max(pareto, key=lambda r: (r["max_seq_len"], -r["perplexity"])),
        "balanced": min(pareto, key=lambda r: norm(r["perplexity"], min(p), max(p)) ** 2
                        + (1 - norm(r["gen_tok_s"], min(g), max(g))) ** 2 + (1 - norm(r["max_seq_len"], min(c), max(c))) ** 2),
    }


def describe(r: dict[str, Any]) -> str:
    """One configuration in one line: label, format, cache, context, split, perplexity, speed."""
    return (f"{r['label']} ({r['format']}) cache {r['cache_mode']}, ctx {r['max_seq_len']}, split {r['split']}: "
            f"ppl {r['perplexity']:.3f}, {r['gen_tok_s']:.1f} tok/s gen")


def recommendation(pareto: Sequence[dict[str, Any]]) -> str:
    """A few lines for the terminal: best quality, fastest, longest context, and a balanced pick."""
    chosen = picks(pareto)
    if not chosen:
        return NOTHING_FITS
    lines = [f"Pareto front: {len(pareto)} configuration(s)."]
    lines += [f"{tag + ':':<16} {describe(r)}" for tag, r in chosen.items()]
    if chosen["balanced"].get("download"):
        lines.append(f"get it:           {chosen['balanced']['download']}")
    if chosen["balanced"].get("run_command"):
        lines.append(f"run it:           {chosen['balanced']['run_command']}")
    return scrub("\n".join(lines))


def compare_formats(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]]) -> str:
    """When a study measured more than one format (e.g. exl2 and GGUF quants of one model), a few lines
    comparing them: configurations measured, on the front, best perplexity and fastest generation.
    Empty for a single-format study."""
    ms = [r for r in measured(rows) if feasible(r)]
    formats = sorted({str(r["format"]) for r in ms})
    if len(formats) < 2:
        return ""
    lines = ["By format (measured configurations within the budget):"]
    for fmt in formats:
        rs = [r for r in ms if r["format"] == fmt]
        best = min(rs, key=lambda r: r["perplexity"])
        fast = max(rs, key=lambda r: r["gen_tok_s"])
        n_front = sum(1 for r in front if r["format"] == fmt)
        lines.append(f"  {fmt:<5} {len(rs)} measured, {n_front} on the front; best ppl {best['perplexity']:.3f} "
                     f"({best['label']} {best['cache_mode']}), fastest {fast['gen_tok_s']:.1f} tok/s "
                     f"({fast['label']} {fast['cache_mode']})")
    return scrub("\n".join(lines))
