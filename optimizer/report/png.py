"""pareto.png: measured configurations within the budget, perplexity against generation tokens/s,
context as colour (log scale over the measured contexts, the same scale as report.html), the front
ringed and labelled, each point's speed spread as a horizontal bar when the runs are stored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optimizer.report.rows import context_range, feasible, measured, speed_range


def front_figure(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]]) -> Any:
    """The matplotlib figure of pareto.png (Agg backend), drawn; labels placed so that none leaves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    # configurations of one (variant, cache) share perplexity and speed across contexts: draw the
    # largest context last so the point shows the best one
    pts = sorted([r for r in measured(rows) if feasible(r)], key=lambda r: r["max_seq_len"])
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    lo, hi = context_range(rows)
    if pts:
        xs = [float(r["gen_tok_s"]) for r in pts]
        ys = [float(r["perplexity"]) for r in pts]
        err = [[x - speed_range(r)[0] for x, r in zip(xs, pts, strict=True)], [speed_range(r)[1] - x for x, r in zip(xs, pts, strict=True)]]
        if any(e > 0 for side in err for e in side):
            ax.errorbar(xs, ys, xerr=err, fmt="none", ecolor="0.6", elinewidth=0.8, capsize=2, zorder=1)
        norm = LogNorm(vmin=lo, vmax=hi) if 0 < lo < hi else None
        sc = ax.scatter(xs, ys, c=[r["max_seq_len"] for r in pts], cmap="viridis", norm=norm, s=28, alpha=0.7,
                        label="measured", zorder=2)
        cb = fig.colorbar(sc, ax=ax, label="max_seq_len (tokens)")
        ticks = sorted({int(r["max_seq_len"]) for r in pts})
        if len(ticks) <= 12:
            cb.set_ticks(ticks)
            cb.set_ticklabels([str(t) for t in ticks])
        cb.minorticks_off()
        lo_x = min(speed_range(r)[0] for r in pts)
        hi_x = max(speed_range(r)[1] for r in pts)  # the spread bars stay inside the axes
        span = (hi_x - lo_x) or hi_x or 1.0
        ax.set_xlim(lo_x - 0.08 * span, hi_x + 0.08 * span)
    if front:
        ax.scatter([r["gen_tok_s"] for r in front], [r["perplexity"] for r in front], facecolors="none",
                   edgecolors="red", s=90, linewidths=1.5, label="Pareto front", zorder=3)
        x0, x1 = ax.get_xlim()
        labels = []
        for r in front:
            right_half = (float(r["gen_tok_s"]) - x0) > 0.5 * (x1 - x0)
            tag = f"{r['label']} {r['cache_mode']} {r['max_seq_len']}" + (" ≈" if r.get("within_noise_of") else "")
            labels.append(ax.annotate(tag, (r["gen_tok_s"], r["perplexity"]), fontsize=7, textcoords="offset points",
                                      xytext=(-6, 3) if right_half else (6, 3), ha="right" if right_half else "left", zorder=4))
    ax.set_xlabel("generation tokens/s (higher is better; bars: slowest to fastest timed run)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("exl2opt: measured configurations within the VRAM budget (≈: within speed noise)", fontsize=10)
    ax.grid(alpha=0.3)
    if pts or front:
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no measured configuration", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.canvas.draw()
    if front:
        _separate(fig, labels)
    return fig


def _separate(fig: Any, labels: list[Any]) -> None:
    """Move front labels that overlap an earlier one below or above their point (points offsets)."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for lab in labels:
        dx = lab.xyann[0]
        for dy in (3, -10, 14, -22, 26, -34):
            lab.xyann = (dx, dy)
            box = lab.get_window_extent(renderer=renderer)
            if not any(box.overlaps(p) for p in placed):
                break
        placed.append(lab.get_window_extent(renderer=renderer))
    fig.canvas.draw()


def labels_overlapping(fig: Any) -> list[str]:
    """Annotation texts of a drawn figure whose boxes overlap another's."""
    from matplotlib.text import Annotation

    renderer = fig.canvas.get_renderer()
    anns = [(a.get_text(), a.get_window_extent(renderer=renderer)) for a in fig.findobj(Annotation)]
    return [f"{t} / {u}" for i, (t, b) in enumerate(anns) for u, c in anns[i + 1:] if b.overlaps(c)]


def texts_outside(fig: Any) -> list[str]:
    """Texts of a drawn figure whose box leaves the canvas (what would be clipped in the PNG). Tick
    labels are judged per axis by what is drawn (ticks outside the view limits are not)."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    box = fig.bbox

    def outside(e: Any) -> bool:
        return bool(e.x0 < box.x0 - 0.5 or e.y0 < box.y0 - 0.5 or e.x1 > box.x1 + 0.5 or e.y1 > box.y1 + 0.5)

    ticks: set[int] = set()
    out = []
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            ticks.update(id(t) for t in axis.get_ticklabels(which="both"))
            e = axis.get_tightbbox(renderer)
            if e is not None and outside(e):
                out.append(f"{name} tick labels")
    for t in fig.findobj(Text):
        if id(t) in ticks or not t.get_visible() or not t.get_text().strip():
            continue
        if outside(t.get_window_extent(renderer=renderer)):
            out.append(t.get_text())
    return out


def write_png(rows: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], path: Path) -> Path:
    """Draw :func:`front_figure` into ``path`` (PNG, 880 x 605 pixels); a label that would still
    leave the canvas widens the saved image instead of being clipped."""
    import matplotlib.pyplot as plt

    fig = front_figure(rows, front)
    fig.savefig(path, bbox_inches="tight" if texts_outside(fig) else None, pad_inches=0.1)
    plt.close(fig)
    return path
