"""``--gpu`` and the predicted columns / decision line shared by ``fit`` and ``plan`` (kept out of plan.py)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import typer

from optimizer.errors import BadOptionError

if TYPE_CHECKING:  # imported where used, not at start-up (``--help``)
    from optimizer.predict.configs import ConfigPrediction
    from optimizer.variant import Variant

#: A pick should run at least this much context when some configuration can (tokens).
TARGET_CONTEXT = 4096


def _list_gpus(value: Optional[str]) -> Optional[str]:
    if value is not None and value.strip().lower() == "list":
        from optimizer.predict.gpus import known_gpus

        print("Memory is the board's nominal size; give --vram what nvidia-smi shows as total (a T4's 16 GB shows "
              "15360 MiB with ECC on: --vram 15GiB).")
        for g in known_gpus():
            rate = f"{g.fp16_tflops:g} TFLOPS FP16" if g.fp16_tflops else "FP16 rate not verified"
            print(f"{g.name:<18} {g.memory_gib:>5g} GB nominal  {g.bandwidth_gb_s:>6g} GB/s  {rate}  ({g.host})")
        raise typer.Exit(0)
    return value


GpuOpt = typer.Option(
    None, "--gpu", callback=_list_gpus, is_eager=True,
    help="GPU model for predicted tok/s: a name (4090, 'RTX 3090', a comma list per GPU), 'auto' (nvidia-smi or torch), "
         "or 'list' to print the known GPUs.",
)


def resolve_gpus(value: Optional[str]) -> tuple[str, ...]:
    """Canonical GPU names for ``--gpu`` (empty: no speed prediction). ``auto`` without a GPU prints one line."""
    from optimizer.predict.gpus import detect_gpu_names, find_gpu

    if value is None or not value.strip():
        return ()
    if value.strip().lower() == "auto":
        names = detect_gpu_names()
        if not names:
            print("--gpu auto: no GPU found (nvidia-smi is not on PATH and torch sees no CUDA device); "
                  "tok/s is not predicted. Name one with --gpu NAME (`exl2opt fit --gpu list`).", file=sys.stderr)
            return ()
        try:
            return tuple(find_gpu(n).name for n in names)
        except BadOptionError as e:
            print(f"--gpu auto: {e}; tok/s is not predicted. Name a similar GPU with --gpu NAME.", file=sys.stderr)
            return ()
    return tuple(find_gpu(part).name for part in value.split(",") if part.strip())


def ppl_cell(p: ConfigPrediction) -> str:
    """``+3.1% (+1.5..+6.4)`` against FP16 weights and cache."""
    v, lo, hi = ((x - 1) * 100 for x in (p.ppl.value, p.ppl.low, p.ppl.high))
    return f"{_pct(v)}% ({_pct(lo)}..{_pct(hi)})"


def _pct(x: float) -> str:
    return f"{x:+.1f}" if abs(x) < 10 else f"{x:+.0f}"


def speed_cell(p: ConfigPrediction) -> str:
    s = p.decode_tok_s
    return "" if s is None else f"{s.value:.0f} ({s.low:.0f}..{s.high:.0f})"


@dataclass(frozen=True)
class Candidate:
    """One runnable configuration with its prediction."""

    variant: Variant
    cache: str
    context: int
    pred: ConfigPrediction


def choose(cands: Sequence[Candidate]) -> tuple[Candidate, Candidate] | None:
    """The pick and the best-quality candidate: among configurations with at least ``TARGET_CONTEXT`` tokens
    (or the largest context any reaches), the lowest predicted perplexity, then the highest tok/s."""
    if not cands:
        return None
    best = min(cands, key=lambda c: c.pred.ppl.value)
    target = min(TARGET_CONTEXT, max(c.context for c in cands))
    pool = [c for c in cands if c.context >= target]
    pick = min(pool, key=lambda c: (round(c.pred.ppl.value, 6), -(c.pred.decode_tok_s.value if c.pred.decode_tok_s else 0)))
    return pick, best


def _get(v: Variant) -> str:
    cmd = v.location.download_command()
    return f"download with `{cmd}`" if cmd else f"use {shlex.quote(v.source)} (local)"


def _model_shape(v: Variant) -> tuple[int, int] | None:
    """(hidden size, decoder layers) from the variant's config (``text_config`` when nested), or None
    when the format does not carry them (GGUF metadata uses other keys)."""
    nested = v.config.get("text_config")
    cfg = nested if isinstance(nested, Mapping) else v.config
    hidden, layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers")
    return (hidden, layers) if isinstance(hidden, int) and isinstance(layers, int) else None


def decision_line(cands: Sequence[Candidate], gpus: Sequence[str]) -> str:
    """One line: what to download, with which cache and context, its predicted quality and speed."""
    chosen = choose(cands)
    if chosen is None:
        return "Pick: nothing fits this budget."
    pick, best = chosen
    worse = (pick.pred.ppl.value / best.pred.ppl.value - 1) * 100
    line = (f"Pick: {_get(pick.variant)}, with cache {pick.cache} and context {pick.context}: "
            f"about {worse:+.1f}% perplexity vs the best that fits ({pick.pred.ppl.value * 100 - 100:+.1f}% vs FP16)")
    if len({shape for c in cands if (shape := _model_shape(c.variant)) is not None}) > 1:
        line += (" (the variants are of different models: perplexity is predicted against each model's own FP16, so "
                 "the pick does not compare the models themselves)")
    if pick.pred.decode_tok_s is not None:
        where = " + ".join(gpus) if len(set(gpus)) > 1 else (gpus[0] if len(gpus) == 1 else f"{len(gpus)}x {gpus[0]}")
        line += f", about {pick.pred.decode_tok_s.value:.0f} tok/s on {where} at {pick.pred.fill} tokens of context"
    return line + "."


def predict_row(variant: Variant, cache: str, max_seq_len: int, verdict: object, gpus: Sequence[str]) -> ConfigPrediction:
    """The prediction of one table row (speed only for a fitting verdict and a known GPU)."""
    from optimizer.predict.configs import predict_config

    return predict_config(variant, cache=cache, max_seq_len=max_seq_len, verdict=verdict, gpus=gpus)  # type: ignore[arg-type]


def summary_columns(p: ConfigPrediction) -> dict[str, object]:
    from optimizer.predict.configs import summary_columns as cols

    return dict(cols(p))


def columns(gpus: Sequence[str]) -> list[str]:
    """Terminal column titles of the predictions."""
    return ["pred. ppl vs FP16"] + ([f"pred. tok/s @{SHOWN}"] if gpus else [])


SHOWN = "2k"


def cells(p: ConfigPrediction, fits: bool) -> dict[str, str]:
    out = {"pred. ppl vs FP16": ppl_cell(p)}
    out[f"pred. tok/s @{SHOWN}"] = speed_cell(p) if fits else ""
    return out


def write_predicted_front(*, spec: object, out_dir: object, gpus: Sequence[str]) -> None:
    """``search --predict-only``: the predicted front's files and one line naming them."""
    from pathlib import Path

    from rich.console import Console

    from optimizer.predict.front import write_predicted
    from optimizer.predict.refit import SpaceEntry
    from optimizer.study import SearchSpec, build_space
    from optimizer.textsafe import plain

    assert isinstance(spec, SearchSpec) and isinstance(out_dir, Path)
    entries = [SpaceEntry(c.key, c.config, c.verdict) for c in build_space(spec)]
    files, front = write_predicted(entries, out_dir=out_dir, gpus=gpus, fill=spec.speed_protocol.context_fill)
    con = Console()
    n_fit = sum(1 for e in entries if e.verdict.fits)
    con.print(plain(f"Predicted (no GPU, no download): {n_fit} feasible of {len(entries)}; predicted front: "
                    f"{len(front)} configurations."), soft_wrap=True)
    for r in front[:10]:
        speed = f", {r['gen_tok_s']:.0f} tok/s ({r['gen_tok_s_low']:.0f}..{r['gen_tok_s_high']:.0f})" if "gen_tok_s" in r else ""
        con.print(plain(f"  {r['label']} {r['cache']} ctx {r['max_seq_len']}: ppl {(r['ppl_vs_fp16'] - 1) * 100:+.1f}% "
                        f"({(r['ppl_vs_fp16_low'] - 1) * 100:+.1f}..{(r['ppl_vs_fp16_high'] - 1) * 100:+.1f}) vs FP16{speed}"),
                  soft_wrap=True)
    con.print(plain("Reports: " + ", ".join(str(f) for f in files)), soft_wrap=True)
    if not any(f.suffix == ".png" for f in files):  # plot() draws nothing without the `plots` extra
        con.print(plain("pareto_predicted.png not drawn: matplotlib is not installed (pip install 'exl2opt[plots]')"),
                  soft_wrap=True)
