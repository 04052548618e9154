"""Rows of a study's reports: one dict per trial, one per configuration, the Pareto front, CSV text.

Everything is rebuilt from the study storage alone (trial user attributes plus the study's
``variants`` user attribute), so ``exl2opt report STUDY`` works without the original sources.

The Pareto front: measured, feasible (``vram_excess_gib <= 0``) configurations, one row per
configuration, not dominated on (perplexity lower, generation tokens/s higher, max_seq_len higher).

Speed noise: when a trial stores its timed runs (``gen_tok_s_runs``), ``gen_tok_s`` is their median
and ``gen_tok_s_min``/``gen_tok_s_max`` their spread. A front point is *within the noise* of another
measured configuration that is at least as good on perplexity and context and whose speed range
reaches the point's: its place on the front rests on a speed difference the runs do not resolve.

Autosplit placement reuse: a trial with ``placement_of`` had its cache built in the placement made
for that configuration (the guided search loads a variant once), so its measured memory is not its own
load; ``measured_vram_gib``/``measured_used_gib`` stay empty there and its VRAM check is the prediction.

No report ever contains a Hub token: locations never hold one, and every text cell is scrubbed
of anything shaped like a token (``hf_...``) and of the value of ``HF_TOKEN`` as a second guard.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from typing import Any

from optimizer.vram import GIB

CONSTRAINT = "vram_excess_gib"

PARETO_COLUMNS = (
    "variant", "format", "label", "bpw", "head_bits", "max_seq_len", "cache_mode", "split",
    "perplexity", "gen_tok_s", "gen_tok_s_min", "gen_tok_s_max", "speed_runs", "within_noise_of", "prompt_tok_s",
    "predicted_vram_gib", "measured_vram_gib", "measured_used_gib", "budget_gib", "download", "run_command",
    "tabby_config", "trial",
)
TRIAL_COLUMNS = (
    "trial", "state", "status", "reason", "variant", "format", "label", "bpw", "head_bits", "max_seq_len",
    "cache_mode", "split", "perplexity", "gen_tok_s", "gen_tok_s_min", "gen_tok_s_max", "speed_runs", "prompt_tok_s",
    "context_fill", "vram_excess_gib", "predicted_vram_gib", "measured_vram_gib", "measured_used_gib", "budget_gib",
    "model_loaded", "placement_of", "duplicate_of", "duration_s", "config_key", "alloc_conf",
)
#: predictions of the guided search stored on a trial (perplexity and generation tokens/s, with intervals)
PREDICTED_ATTRS = tuple(f"predicted_{q}{s}" for q in ("ppl", "gen_tok_s") for s in ("", "_low", "_high"))
#: which trial of a configuration stands for it when it was tried more than once (lower first)
STATUS_RANK = {"measured": 0, "predicted": 1, "skipped": 1, "failed": 2, "infeasible": 3, "reused": 4, "outside_space": 5}

_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


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


def _runs(ua: dict[str, Any]) -> list[float]:
    runs = ua.get("gen_tok_s_runs")
    return [float(x) for x in runs] if isinstance(runs, list) else []


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per trial (every state) with the columns of :data:`TRIAL_COLUMNS`, plus the raw
    per-device ``predicted`` and ``measured`` records (bytes) and ``gen_tok_s_runs`` for the page."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        pred = ua.get("predicted")
        runs = _runs(ua)
        # memory measured in another configuration's autosplit placement is not this configuration's load
        mem = None if ua.get("placement_of") else ua.get("measured")
        rows.append({
            "trial": t.number, "state": t.state.name, "status": ua.get("status", ""), "reason": ua.get("reason", ""),
            "variant": ua.get("source", ua.get("variant", "")), "variant_key": ua.get("variant", ""),
            "format": ua.get("format", ""), "label": ua.get("label", ""), "bpw": ua.get("bits"), "head_bits": ua.get("head_bits"),
            "max_seq_len": ua.get("max_seq_len", t.params.get("max_seq_len")),
            "cache_mode": ua.get("cache", t.params.get("cache")), "split": ua.get("split", ""),
            "perplexity": ua.get("perplexity"), "gen_tok_s": ua.get("gen_tok_s"),
            "gen_tok_s_min": min(runs) if runs else None, "gen_tok_s_max": max(runs) if runs else None,
            "speed_runs": len(runs) if runs else (1 if ua.get("gen_tok_s") is not None else None),
            "gen_tok_s_runs": runs, "prompt_tok_s": ua.get("prompt_tok_s"), "context_fill": ua.get("context_fill"),
            "vram_excess_gib": t.constraints.get(CONSTRAINT) if hasattr(t, "constraints") else None,
            "predicted_vram_gib": _gib_list(pred, "total"), "measured_vram_gib": _gib_list(mem, "peak_allocated"),
            "measured_used_gib": _gib_list(mem, "used"), "budget_gib": _gib_list(pred, "budget"),
            "model_loaded": ua.get("model_loaded"), "placement_of": ua.get("placement_of", ""),
            "duplicate_of": ua.get("duplicate_of", ""),
            "duration_s": round(dur, 3) if dur is not None else None, "config_key": ua.get("config_key", ""),
            "alloc_conf": ua.get("alloc_conf", ""),
            "predicted": pred or [], "measured": mem or [],
            **{k: ua.get(k) for k in PREDICTED_ATTRS},
        })
    return rows


def configurations(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (``config_key``): its most telling trial (measured before failed
    before rejected before reused), with ``trials`` = how many trials it had. Trials without a
    configuration (asked but never stamped) are left out. Ordered by trial number."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["config_key"]:
            groups.setdefault(r["config_key"], []).append(r)
    out = []
    for rs in groups.values():
        best = min(rs, key=lambda r: (STATUS_RANK.get(str(r["status"]), 9), r["state"] != "COMPLETE", r["trial"]))
        out.append({**best, "trials": len(rs)})
    out.sort(key=lambda r: r["trial"])
    return out


def feasible(r: dict[str, Any]) -> bool:
    v = r.get(CONSTRAINT)
    return v is None or float(v) <= 0


def measured(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured configurations (COMPLETE trials with status measured), one each, first trial kept."""
    seen: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["state"] == "COMPLETE" and r["status"] == "measured":
            seen.setdefault(r["config_key"], r)
    return list(seen.values())


def _dominates(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    return a[0] <= b[0] and a[1] >= b[1] and a[2] >= b[2] and a != b


def speed_range(r: dict[str, Any]) -> tuple[float, float]:
    """(slowest, fastest) timed generation run in tokens/s; the single value when runs are not stored."""
    g = float(r["gen_tok_s"])
    lo, hi = r.get("gen_tok_s_min"), r.get("gen_tok_s_max")
    return (float(lo) if lo is not None else g, float(hi) if hi is not None else g)


def noise_rival(r: dict[str, Any], pool: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Another configuration in ``pool`` at least as good on perplexity and context whose speed range
    reaches ``r``'s slowest run: ``r`` beats it only by a speed difference within the noise."""
    lo = speed_range(r)[0]
    best = None
    for q in pool:
        if q["config_key"] == r["config_key"]:
            continue
        if float(q["perplexity"]) <= float(r["perplexity"]) and int(q["max_seq_len"]) >= int(r["max_seq_len"]) \
                and speed_range(q)[1] >= lo and (best is None or float(q["gen_tok_s"]) > float(best["gen_tok_s"])):
            best = q
    return best


def pareto_rows(rows: Sequence[dict[str, Any]], variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Non-dominated measured feasible configurations, one row each, best perplexity first;
    ``within_noise_of`` names a rival when the point's advantage is within the speed noise."""
    best = {r["config_key"]: r for r in measured(rows) if feasible(r)}
    pts = {k: (float(r["perplexity"]), float(r["gen_tok_s"]), float(r["max_seq_len"])) for k, r in best.items()}
    front = [k for k, p in pts.items() if not any(_dominates(q, p) for k2, q in pts.items() if k2 != k)]
    out = []
    for k in front:
        r = best[k]
        rival = noise_rival(r, list(best.values()))
        out.append({
            **{c: r.get(c) for c in PARETO_COLUMNS if c in r}, "config_key": k,
            "download": variants.get(k.split("|")[0], {}).get("download", ""),
            "within_noise_of": f"{rival['label']} {rival['cache_mode']} {rival['max_seq_len']}" if rival else "",
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


def context_range(rows: Sequence[dict[str, Any]]) -> tuple[int, int]:
    """(smallest, largest) context of the measured configurations, in tokens: the one colour scale
    of both plots (the PNG's colour bar and the page's). (0, 0) when nothing was measured."""
    ctx = [int(r["max_seq_len"]) for r in measured(rows)]
    return (min(ctx), max(ctx)) if ctx else (0, 0)
