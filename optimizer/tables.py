"""Rows for tables, CSV and JSON: plan rows, fit rows. Bytes stay ints; GiB columns are for reading.

The ``run`` column is the format's one-line Python recipe (``optimizer.recipes.run_line``).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from typing import Any

from optimizer.recipes import run_line
from optimizer.space import FitResult, PlanRow
from optimizer.units import GIB
from optimizer.vram import VramVerdict


def _gib(n: int) -> float:
    return round(n / GIB, 3)


def verdict_columns(v: VramVerdict) -> dict[str, Any]:
    """Totals and per-device columns of a verdict."""
    row: dict[str, Any] = {
        "weights_gib": _gib(sum(d.weights for d in v.devices)),
        "cache_gib": _gib(sum(d.cache + d.cache_staging for d in v.devices)),
        "total_gib": _gib(v.total),
        "budget_gib": _gib(v.budget),
        "headroom_gib": _gib(v.headroom),
        "fits": v.fits,
        "per_gpu_gib": ";".join(f"{d.total / GIB:.3f}" for d in v.devices),
        "total_bytes": v.total,
        "reason": v.reason,
    }
    return row


def plan_record(r: PlanRow) -> dict[str, Any]:
    """One flat CSV/table record of a plan row."""
    c = r.config
    return {
        "format": c.variant.format,
        "variant": c.variant.source,
        "label": c.variant.label,
        "bits": c.variant.bits,
        "head_bits": c.variant.head_bits,
        "max_seq_len": c.max_seq_len,
        "cache": c.cache,
        "split": c.split.label,
        **verdict_columns(r.verdict),
    }


def breakdown_json(v: VramVerdict) -> list[dict[str, Any]]:
    """Per-device itemized breakdown in bytes."""
    return [
        {
            "gpu": d.index,
            "budget": d.budget,
            "overhead": d.overhead,
            "weights": d.weights,
            "cache": d.cache,
            "cache_staging": d.cache_staging,
            "scratch": d.scratch,
            "rope": d.rope,
            "transient": d.transient,
            "total": d.total,
            "margin": d.margin,
            "headroom": d.headroom,
            "modules": d.n_modules,
            "kv_layers": d.n_kv_layers,
        }
        for d in v.devices
    ]


def fit_record(f: FitResult, *, batch_size: int = 1, chunk_len: int | None = None) -> dict[str, Any]:
    """One flat record of a fit result (``batch_size`` / ``chunk_len`` go into the run recipe)."""
    rec: dict[str, Any] = {
        "format": f.variant.format,
        "variant": f.variant.source,
        "label": f.variant.label,
        "cache": f.cache,
        "split": f.split.label,
        "default_ctx": f.default_ctx,
        "max_ctx": f.max_seq_len,
        "fits_default": f.max_seq_len is not None and f.max_seq_len >= f.default_ctx - f.default_ctx % 256,
    }
    if f.verdict is not None and f.max_seq_len is not None:
        rec.update({"total_gib": _gib(f.verdict.total), "headroom_gib": _gib(f.verdict.headroom)})
        line = run_line(f.variant.format)
        rec["run"] = line(
            cache=f.cache, max_seq_len=f.max_seq_len, split=f.split, batch_size=batch_size, chunk_len=chunk_len,
        ) if line is not None else ""
    else:
        rec.update({"total_gib": None, "headroom_gib": None, "run": ""})
    return rec


def to_csv(records: Sequence[dict[str, Any]]) -> str:
    """Records as CSV text (header from the first record)."""
    if not records:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(records[0].keys()), lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow(r)
    return buf.getvalue()


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def text_table(records: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain aligned text of selected columns (no rich: a 350-row table renders in milliseconds).

    Cells are printed as plain text with control characters escaped and passwords masked; columns
    whose every cell is a number are right-aligned.
    """
    from optimizer.textsafe import safe

    head = [safe(c) for c in columns]
    rows = [[safe("" if r.get(c) is None else r.get(c)) for c in columns] for r in records]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    numeric = [bool(cells) and all(_is_number(x) for x in cells if x) for cells in zip(*rows, strict=True)] if rows \
        else [False] * len(columns)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(x.rjust(w) if num else x.ljust(w)
                         for x, w, num in zip(cells, widths, numeric, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
