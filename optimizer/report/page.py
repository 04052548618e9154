"""report.html: one self-contained page (inline CSS, JavaScript and data; no network, no CDN).

The page shows the Pareto front (SVG scatter, context as colour on the log scale of pareto.png,
speed spread bars, a hover with the configuration and its download command), the recommendation,
the measurement protocol and its noise, a sortable table of every configuration with its status and
reason, per-configuration stacked VRAM bars (predicted by term beside measured), and predicted
against measured. The data is one JSON document inside the page, scrubbed of tokens.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from optimizer.report.rows import context_range, feasible, scrub
from optimizer.report.text import picks, recommendation
from optimizer.vram import GIB

TERMS = ("weights", "cache", "staging", "scratch", "transient", "overhead")


def _asset(name: str) -> str:
    return resources.files("optimizer.report").joinpath("assets", name).read_text(encoding="utf-8")


def split_terms(dev: dict[str, Any]) -> dict[str, int]:
    """A stored per-device prediction (bytes) as the page's six terms. Studies that keep the quantized
    cache's FP16 staging buffer apart (``cache_staging``) show it apart; older ones count it in cache."""
    staging = int(dev.get("cache_staging", 0))
    terms = {"weights": int(dev.get("weights", 0)), "cache": int(dev.get("cache", 0)) - staging, "staging": staging,
             "scratch": int(dev.get("scratch", 0)), "transient": int(dev.get("transient", 0)), "overhead": int(dev.get("overhead", 0))}
    return {**terms, "index": int(dev.get("index", 0)), "budget": int(dev.get("budget", 0)),
            "total": int(dev.get("total", sum(terms.values())))}


def binding(pred: Sequence[dict[str, int]]) -> str:
    """For a rejected configuration: the GPU furthest over its budget and its largest term (GiB)."""
    over = [d for d in pred if d["total"] > d["budget"]]
    if not over:
        return ""
    d = max(over, key=lambda d: d["total"] - d["budget"])
    term = max(TERMS, key=lambda t: d[t])
    return (f"GPU {d['index']} needs {d['total'] / GIB:.3f} GiB of {d['budget'] / GIB:.3f} GiB "
            f"(+{(d['total'] - d['budget']) / GIB:.3f}); largest term {term} {d[term] / GIB:.3f} GiB")


def _num(v: Any) -> float | None:
    try:
        x = None if v is None or v == "" else float(v)
    except (TypeError, ValueError):
        return None
    return x if x is not None and math.isfinite(x) else None


def config_record(r: dict[str, Any], *, front_rank: dict[str, int], noise: dict[str, str],
                  variants: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One configuration as the page's JavaScript reads it (sizes in bytes, speeds in tokens/s)."""
    pred = [split_terms(d) for d in r.get("predicted") or []]
    meas = [{"index": int(m.get("index", 0)), "peak": int(m.get("peak_allocated", 0)), "used": int(m.get("used", 0))}
            for m in r.get("measured") or []]
    vkey = str(r.get("variant_key") or str(r["config_key"]).split("|")[0])
    bind = binding(pred) if r["status"] == "infeasible" else ""
    reason = scrub(str(r.get("reason") or ""))
    if bind and re.match(r"GPU \d+ needs", reason):
        reason = ""  # the binding line says the same with the term
    return {
        "key": r["config_key"], "trial": r["trial"], "trials": r.get("trials", 1), "status": r["status"] or r["state"].lower(),
        "state": r["state"], "reason": reason, "binding": bind,
        "variant": scrub(str(r["variant"])), "format": r["format"], "label": scrub(str(r["label"])), "bpw": r.get("bpw"),
        "head_bits": r.get("head_bits"), "ctx": int(r["max_seq_len"] or 0), "cache": r["cache_mode"], "split": r["split"],
        "ppl": _num(r.get("perplexity")), "gen": _num(r.get("gen_tok_s")), "gen_min": _num(r.get("gen_tok_s_min")),
        "gen_max": _num(r.get("gen_tok_s_max")), "runs": list(r.get("gen_tok_s_runs") or []),
        "prompt": _num(r.get("prompt_tok_s")), "fill": r.get("context_fill"), "feasible": feasible(r),
        "pred": pred, "meas": meas, "pred_gib": r.get("predicted_vram_gib", ""), "meas_gib": r.get("measured_vram_gib", ""),
        "download": scrub(str(variants.get(vkey, {}).get("download", ""))),
        "front": front_rank.get(r["config_key"]), "noise_of": noise.get(r["config_key"], ""),
        "duration": r.get("duration_s"),
        **{f"pred_{k}{s}": _num(r.get(f"predicted_{p}{s}")) for k, p in (("ppl", "ppl"), ("gen", "gen_tok_s"))
           for s in ("", "_low", "_high")},
    }


def protocol_lines(*, eval_p: dict[str, Any], speed_p: dict[str, Any], configs: Sequence[dict[str, Any]]) -> list[str]:
    """The measurement protocol and the speed noise seen in this study, in plain sentences."""
    lines = []
    if eval_p:
        lines.append(
            f"Perplexity: {eval_p.get('n_windows')} windows of {eval_p.get('window')} tokens of {eval_p.get('dataset')}, BOS first "
            f"(a shorter window in a shorter context); the first {eval_p.get('prefill')} tokens of each window are prefilled into "
            f"the cache and the rest scored through it in chunks of {eval_p.get('score_chunk')}, so the cache precision counts. "
            "It is deterministic: measured once per variant, cache mode and window.")
    if speed_p:
        reps = speed_p.get("repeats", 1)
        lines.append(
            f"Speed: the cache is filled with {speed_p.get('context_fill')} tokens (fewer when the context is shorter), timed as "
            f"prompt speed; then {speed_p.get('gen_tokens')} single-token decodes are timed as generation speed, after "
            f"{speed_p.get('warmup')} untimed warm-up pass(es). The timed measurement runs {reps} time(s); the tables give "
            "the median and the slowest and fastest run.")
    spreads = [(c["gen_max"] - c["gen_min"]) / c["gen"] for c in configs
               if c["status"] == "measured" and len(c["runs"]) > 1 and c["gen"]]
    if spreads:
        lines.append(
            f"Noise: over {len(spreads)} measured configurations the timed runs of one configuration spread by "
            f"{100 * statistics.median(spreads):.1f} % of the median (median), {100 * max(spreads):.1f} % at worst. "
            "A front point marked \u2248 is ahead of a configuration at least as good on perplexity and context only by a "
            "speed difference inside the two configurations' run ranges.")
    else:
        lines.append("Noise: this study stored one timed run per configuration, so its speed noise is unknown; "
                     "treat small speed differences on the front as unresolved.")
    return lines


def panel_lines(configs: Sequence[dict[str, Any]]) -> list[str]:
    """How far predictions were off: VRAM (without the overhead term) against measured peak allocation
    per GPU measurement; perplexity and speed against the guided search's predictions, when stored."""
    errs = []
    for c in configs:
        for m in c["meas"]:
            d = next((p for p in c["pred"] if p["index"] == m["index"]), None)
            if d and d["total"] - d["overhead"] > 0:
                errs.append((m["peak"] - (d["total"] - d["overhead"])) / (d["total"] - d["overhead"]))
    lines = []
    for name, got, want in (("Perplexity", "ppl", "pred_ppl"), ("Generation speed", "gen", "pred_gen")):
        rel = [(c[got] - c[want]) / c[want] for c in configs if c["status"] == "measured" and c[got] and c[want]]
        if rel:
            lines.append(f"{name}: over {len(rel)} measured configurations the prediction was off by "
                         f"{100 * statistics.median(abs(x) for x in rel):.1f} % (median absolute), "
                         f"{100 * max(abs(x) for x in rel):.1f} % at worst.")
    if not errs:
        return lines
    return [f"VRAM: over {len(errs)} measured GPU loads, the measured peak allocation differs from the prediction "
            f"(without the overhead term) by {100 * statistics.median(errs):+.2f} % (median), from "
            f"{100 * min(errs):+.2f} % to {100 * max(errs):+.2f} % (positive: more than predicted).", *lines]


def page_data(*, study: Any, configs: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
              all_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document the page renders."""
    ua = study.user_attrs
    variants = ua.get("variants", {}) or {}
    rank = {r["config_key"]: i + 1 for i, r in enumerate(front)}
    noise = {r["config_key"]: r["within_noise_of"] for r in front if r.get("within_noise_of")}
    recs = [config_record(r, front_rank=rank, noise=noise, variants=variants) for r in configs]
    runs = {r["config_key"]: scrub(str(r.get("run_command") or "")) for r in front}  # front rows carry their recipe
    recs = [{**c, "run": runs.get(c["key"], "")} for c in recs]
    counts = {"configurations": len(recs)}
    for s in ("measured", "infeasible", "failed", "predicted", "skipped", "reused"):
        counts[s] = sum(1 for c in recs if c["status"] == s)
    budget = ua.get("budget_bytes") or []
    return {
        "title": f"exl2opt report: {scrub(study.study_name)}", "study": scrub(study.study_name),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_text": ", ".join(f"GPU {i} {b / GIB:.3f} GiB" for i, b in enumerate(budget)) or "unknown",
        "split": ua.get("split", ""), "counts": counts, "ctx_range": list(context_range(all_rows)),
        "configs": recs, "front": [r["config_key"] for r in front],
        "picks": [[tag, r["config_key"]] for tag, r in picks(front).items()], "recommendation": recommendation(front),
        "protocol": protocol_lines(eval_p=ua.get("eval_protocol") or {}, speed_p=ua.get("speed_protocol") or {}, configs=recs),
        "panels": panel_lines(recs),
    }


def render(data: dict[str, Any]) -> str:
    """The page's HTML with ``data`` embedded (``</`` escaped so no text can close the script)."""
    blob = json.dumps(data, ensure_ascii=True, allow_nan=False, default=str).replace("</", "<\\/")
    html = _asset("page.html")
    title = data["title"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    js = '"use strict";\n(function () {\n' + _asset("page.js") + _asset("panels.js") + "})();\n"
    for mark, text in (("/*CSS*/", _asset("page.css")), ("/*JS*/", js), ("__TITLE__", title), ("__DATA__", blob)):
        html = html.replace(mark, text, 1)
    return html


def write_page(*, study: Any, configs: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]],
               all_rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Write report.html for ``study`` into ``path``."""
    path.write_text(render(page_data(study=study, configs=configs, front=front, all_rows=all_rows)), encoding="utf-8")
    return path
