"""``exl2opt plan`` and ``exl2opt fit``: predictions from metadata only (no GPU, no weights)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from optimizer.calibration import overhead_line
from optimizer.cli import _common as c
from optimizer.cli import _predict as pr
from optimizer.cli import app

if TYPE_CHECKING:  # the library is imported inside the commands, not at start-up (``--help``)
    from optimizer.formats import RuntimeOptions
    from optimizer.space import Budget, FitResult
    from optimizer.variant import Variant
    from optimizer.vram import Split


def _budget_line(per_device: tuple[int, ...], n: int) -> str:
    from optimizer.units import fmt_both

    per = per_device if len(per_device) == n else per_device * n
    return " + ".join(fmt_both(b) for b in per)


_PLAN_COLS = {
    "label": "variant",
    "max_seq_len": "ctx",
    "cache": "cache",
    "split": "split",
    "weights_gib": "weights GiB",
    "cache_gib": "cache GiB",
    "per_gpu_gib": "total GiB/GPU",
    "headroom_gib": "headroom GiB",
    "fits": "fits",
}


def _short(rec: dict) -> dict:
    """A plan record with short column names for the terminal table."""
    out = {new: rec[old] for old, new in _PLAN_COLS.items()}
    out["fits"] = "yes" if rec["fits"] else "NO"
    out["total GiB/GPU"] = rec["per_gpu_gib"].replace(";", " + ")
    return out


@app.command()
def plan(
    model: list[str] = c.ModelOpt,
    vram: str = c.VramOpt,
    gpus: Optional[int] = c.GpusOpt,
    gpu_split: Optional[str] = c.GpuSplitOpt,
    reserve: Optional[str] = c.ReserveOpt,
    ctx: str = c.CtxOpt,
    cache: Optional[str] = c.CacheOpt,
    overhead: Optional[str] = c.OverheadOpt,
    margin: Optional[str] = c.MarginOpt,
    chunk: int = c.ChunkOpt,
    batch: int = c.BatchOpt,
    flash_attn: bool = c.FlashOpt,
    offline: bool = c.OfflineOpt,
    n_gpu_layers: Optional[int] = c.NGpuLayersOpt,
    fmt: Optional[str] = c.FormatOpt,
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write every configuration to this CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with per-GPU breakdowns) instead of a table."),
    only_fits: bool = typer.Option(False, "--fits-only", help="Show only configurations that fit."),
    gpu: Optional[str] = pr.GpuOpt,
) -> None:
    """Predict VRAM per GPU for every variant x context x cache mode, and whether it fits."""
    from optimizer.formats import RuntimeOptions
    from optimizer.sources import resolve_sources
    from optimizer.space import check_caches, enumerate_configs, margin_note, plan_rows
    from optimizer.tables import breakdown_json, plan_record, text_table, to_csv, to_json
    from optimizer.textsafe import safe

    c.check_output_file(csv_path, option="--csv")
    budget = c.budget_from(vram=vram, overhead=overhead, margin=margin)
    split = c.split_from(gpus=gpus, gpu_split=gpu_split, budget=budget, reserve=reserve)
    contexts = c.parse_contexts(ctx)
    caches = c.parse_caches(cache)
    runtime = RuntimeOptions(batch_size=batch, chunk_len=chunk, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers)
    variants = c.filter_formats(resolve_sources(specs=model, hub=c.hub_options(offline=offline)), fmt)
    if caches:
        caches = check_caches(variants, caches)
    rows = plan_rows(
        configs=enumerate_configs(variants=variants, contexts=contexts, caches=caches, split=split),
        budget=budget,
        runtime=runtime,
    )
    gpu_names = pr.resolve_gpus(gpu)
    preds = [pr.predict_row(r.config.variant, r.config.cache, r.config.max_seq_len, r.verdict, gpu_names) for r in rows]
    records = [{**plan_record(r), **pr.summary_columns(p)} for r, p in zip(rows, preds, strict=True)]
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text(to_csv(records))
    shown = [(r, rec) for r, rec in zip(rows, records, strict=True) if rec["fits"] or not only_fits]
    if as_json:
        print(to_json([{**rec, "devices": breakdown_json(r.verdict)} for r, rec in shown]))
        return
    print(f"Budget: {_budget_line(budget.per_device, split.n_devices)}; split {split.label}")
    if budget.overhead_note:
        print(overhead_line(overhead=budget.overhead, note=budget.overhead_note, formats=[v.format for v in variants]))
    print(margin_note(formats=[v.format for v in variants], budget=budget))
    several = len({v.format for v in variants}) > 1  # one table for every format: say which row is which
    cols = (["format"] if several else []) + list(_PLAN_COLS.values()) + pr.columns(gpu_names)
    by_rec = {id(rec): p for rec, p in zip(records, preds, strict=True)}
    print(text_table([{"format": rec["format"], **_short(rec), **pr.cells(by_rec[id(rec)], rec["fits"])}
                      for _, rec in shown], cols))
    n_fit = sum(1 for rec in records if rec["fits"])
    print(safe(f"{n_fit} of {len(records)} configurations fit." + (f" CSV: {csv_path}" if csv_path else "")))
    cands = [pr.Candidate(r.config.variant, r.config.cache, r.config.max_seq_len, p)
             for r, p in zip(rows, preds, strict=True) if r.verdict.fits]
    print(safe(pr.decision_line(cands, gpu_names)))


def _default_line(variant: Variant, *, split: Split, budget: Budget, runtime: RuntimeOptions) -> str:
    """What happens with the engine's defaults: the full context and the default (first) cache mode."""
    from optimizer.formats import rules_for
    from optimizer.space import Configuration, evaluate
    from optimizer.units import fmt_gib

    rules = rules_for(variant.format)
    ctx = rules.default_context(variant)
    cache = rules.CACHE_MODE_NAMES[0]
    v = evaluate(config=Configuration(variant=variant, max_seq_len=ctx, cache=cache, split=split), budget=budget, runtime=runtime)
    if not v.placed:
        return f"default context {ctx} tokens with a {cache} cache: does NOT load: {v.reason}"
    kv = sum(d.cache + d.cache_staging for d in v.devices)
    verdict = "fits" if v.fits else "does NOT fit"
    return (f"default context {ctx} tokens with a {cache} cache: needs {fmt_gib(v.total)} "
            f"(weights {fmt_gib(sum(d.weights for d in v.devices))}, cache alone {fmt_gib(kv)}) "
            f"of {fmt_gib(v.budget)}: {verdict}")


def _split_line(auto: FitResult, better: FitResult) -> str:
    """``label cache: --gpu-split 7.9,7.8 holds N tokens (autosplit: M)``."""
    from optimizer.vram import MIB

    s = better.split
    how = (f"--gpu-split {s.label} (ExLlamaV2 gpu_split, GiB per GPU for weights and buffers)" if s.mode == "manual"
           else f"--gpus {s.n_devices} --reserve {','.join(f'{b // MIB}MiB' for b in s.reserve_bytes)} "
                "(ExLlamaV2 load_autosplit reserve_vram)")
    return (f"{better.variant.label} {better.cache}: {how} holds {better.max_seq_len} tokens "
            f"(autosplit: {auto.max_seq_len or 'nothing fits'})")


def _chunk_lines(gains: list[tuple[FitResult, FitResult]]) -> list[str]:
    """One line per variant: each cache's context with the smaller chunk (and with the asked one)."""
    by_variant: dict[str, list[str]] = {}
    for asked, small in gains:
        by_variant.setdefault(asked.variant.label, []).append(
            f"{asked.cache} {small.max_seq_len} (now {asked.max_seq_len or 'none'})")
    return [f"{label}: {', '.join(parts)}" for label, parts in by_variant.items()]


@app.command()
def fit(
    model: list[str] = c.ModelOpt,
    vram: str = c.VramOpt,
    gpus: Optional[int] = c.GpusOpt,
    gpu_split: Optional[str] = c.GpuSplitOpt,
    reserve: Optional[str] = c.ReserveOpt,
    cache: Optional[str] = c.CacheOpt,
    overhead: Optional[str] = c.OverheadOpt,
    margin: Optional[str] = c.MarginOpt,
    chunk: int = c.ChunkOpt,
    batch: int = c.BatchOpt,
    flash_attn: bool = c.FlashOpt,
    offline: bool = c.OfflineOpt,
    n_gpu_layers: Optional[int] = c.NGpuLayersOpt,
    fmt: Optional[str] = c.FormatOpt,
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write the answer to this CSV file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    gpu: Optional[str] = pr.GpuOpt,
    recipe_opt: str = typer.Option(
        "auto", "--recipe",
        help="How-to-run recipes: auto (exl2: TabbyAPI config + exllamav2 example script; GGUF: llama-server), "
             "all, or a list of tabby, webui, script, python, llama.cpp.",
    ),
) -> None:
    """For each variant and cache mode: the largest context (a multiple of 256) that fits, and how to run it."""
    from optimizer.formats import RuntimeOptions
    from optimizer.recipes import parse_recipe_option, spec_for
    from optimizer.recipes.present import fit_section, record_fields, tools_of
    from optimizer.sources import resolve_sources
    from optimizer.space import (
        SMALL_CHUNK,
        better_split,
        check_caches,
        margin_note,
        max_context,
        smaller_chunk_gains,
        split_search,
    )
    from optimizer.tables import fit_record, text_table, to_csv, to_json
    from optimizer.textsafe import safe

    chosen = parse_recipe_option(recipe_opt)
    c.check_output_file(csv_path, option="--csv")
    budget = c.budget_from(vram=vram, overhead=overhead, margin=margin)
    split = c.split_from(gpus=gpus, gpu_split=gpu_split, budget=budget, reserve=reserve)
    caches = c.parse_caches(cache)
    runtime = RuntimeOptions(batch_size=batch, chunk_len=chunk, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers)
    variants = c.filter_formats(resolve_sources(specs=model, hub=c.hub_options(offline=offline)), fmt)
    from optimizer.formats import default_cache_modes, rules_for

    if caches:
        caches = check_caches(variants, caches)
    gpu_names = pr.resolve_gpus(gpu)
    records, cands, fits, beats = [], [], [], []
    all_tools = tuple(dict.fromkeys(t for v in variants for t in tools_of(v.format, chosen)))
    for v in variants:
        rules = rules_for(v.format)
        cms = tuple(cm for cm in caches if cm in rules.CACHE_MODE_NAMES) if caches else default_cache_modes(rules)
        for cm in cms:
            res = max_context(variant=v, cache=cm, split=split, budget=budget, runtime=runtime)
            extra = {"autosplit_max_ctx": res.max_seq_len} if split.mode == "auto" else {}
            if split.mode == "auto":  # a manual split or per-GPU reserves may hold more
                found = split_search(variant=v, cache=cm, n_devices=split.n_devices, budget=budget, runtime=runtime)
                better = better_split(res, found)
                if better is not None:
                    beats.append((res, better))
                    res = better
            p = pr.predict_row(v, cm, res.max_seq_len or res.default_ctx, res.verdict, gpu_names)
            spec = spec_for(v, max_seq_len=res.max_seq_len, cache=cm, split=res.split, runtime=runtime) if res.max_seq_len else None
            fits.append(res)
            records.append({**fit_record(res, batch_size=batch, chunk_len=chunk), **extra, **pr.summary_columns(p),
                            **{f"recipe_{t}": "" for t in all_tools}, **record_fields(spec, tools_of(v.format, chosen))})
            records[-1]["_cells"] = pr.cells(p, res.max_seq_len is not None)
            if res.max_seq_len:
                cands.append(pr.Candidate(v, cm, res.max_seq_len, p))
    cells = [r.pop("_cells") for r in records]
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text(to_csv(records))
    if as_json:
        print(to_json(records))
        return
    print(f"Budget: {_budget_line(budget.per_device, split.n_devices)}; split {split.label}")
    if budget.overhead_note:
        print(overhead_line(overhead=budget.overhead, note=budget.overhead_note, formats=[v.format for v in variants]))
    print(margin_note(formats=[v.format for v in variants], budget=budget))
    several = len({v.format for v in variants}) > 1  # one table for every format: say which row is which
    for v in variants:
        print(safe(f"{v.label}{f' ({v.format})' if several else ''}: {v.source}"))
        print(safe("  " + _default_line(v, split=split, budget=budget, runtime=runtime)))
    print(text_table(
        [{"format": r["format"], "variant": r["label"], "cache": r["cache"], "default ctx": r["default_ctx"],
          "max ctx that fits": r["max_ctx"] or "none", "total GiB": r["total_gib"], "headroom GiB": r["headroom_gib"], **cl}
         for r, cl in zip(records, cells, strict=True)],
        [*(["format"] if several else []), "variant", "cache", "default ctx", "max ctx that fits", "total GiB",
         "headroom GiB", *pr.columns(gpu_names)],
    ))
    if beats:
        print(f"Better than autosplit{' with --reserve' if reserve else ''} on {split.n_devices} GPUs "
              "(the table and the recipes below use these):")
        for auto, better in beats:
            print(safe(f"  {_split_line(auto, better)}"))
    gains = smaller_chunk_gains(fits=fits, budget=budget, runtime=runtime)
    if gains:
        print(f"A smaller prompt chunk holds more context (prompts are then processed {SMALL_CHUNK} tokens at a time, "
              f"more slowly): with --chunk {SMALL_CHUNK}")
        for line in _chunk_lines(gains):
            print(safe(f"  {line}"))
    print(safe(pr.decision_line(cands, gpu_names)))
    if any(r["max_ctx"] for r in records):
        picked = pr.choose(cands)
        print("How to run:")
        for line in fit_section(fits, runtime=runtime, chosen=chosen,
                                pick=(picked[0].variant.key, picked[0].cache) if picked else None).splitlines():
            print(safe(line))
    else:
        print("Nothing fits this budget, even at 256 tokens of context.")
