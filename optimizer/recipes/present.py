"""Recipes placed into ``fit`` output, fit CSV/JSON records and the Pareto rows of ``search``.

``fit`` without ``--recipe`` (``auto``) prints, per variant, the format's default recipes (exl2 and
EXL3: TabbyAPI block + example-script line; GGUF: ``llama-server``) for the answer with the longest context,
and one shell line for each other answer. With ``--recipe a,b`` every answer gets every named recipe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from optimizer.allocator import ENV, EXPANDABLE, fragmentation_allowance
from optimizer.errors import BadOptionError
from optimizer.recipes import (
    RunSpec,
    default_tools,
    model_path,
    recipe,
    render,
    shell_tool,
    spec_for,
    split_from_label,
    tools_for,
)
from optimizer.units import fmt_gib
from optimizer.variant import Location

#: Formats whose engines run on PyTorch's CUDA allocator (the allocator setting applies).
TORCH_FORMATS = frozenset({"exl2", "exl3"})


def tools_of(fmt: str, chosen: Sequence[str]) -> tuple[str, ...]:
    """The tools to print for ``fmt``: ``chosen``, or the format's default when empty."""
    return tuple(chosen) or default_tools(fmt)


def record_fields(spec: RunSpec | None, tools: Sequence[str]) -> dict[str, str]:
    """``recipe_<tool>`` fields of one CSV/JSON record (text, or the note when unsupported; empty
    when there is nothing to run)."""
    out: dict[str, str] = {}
    for t in tools:
        if spec is None:
            out[f"recipe_{t}"] = ""
            continue
        r = recipe(spec, tool=t)
        out[f"recipe_{t}"] = r.text or "; ".join(r.notes)
    return out


def _allocator_line(fits: Sequence[Any]) -> str:
    """One line on the allocator setting, with the fragmentation allowance the model assumes without it."""
    worst = 0
    for f in fits:
        if f.verdict is not None and f.max_seq_len:
            worst = max(worst, max(fragmentation_allowance(transient_bytes=d.transient, expandable=False)
                                   for d in f.verdict.devices))
    return (f"The recipes set {ENV}={EXPANDABLE}, which the VRAM model assumes; without it, allow up to "
            f"{fmt_gib(worst)} more per GPU for fragmentation (the largest transient allocation).")


def fit_section(fits: Sequence[Any], *, runtime: Any, chosen: Sequence[str], pick: tuple[str, str] | None = None) -> str:
    """The "how to run" text of ``fit`` for its answers (``FitResult`` objects).

    With ``chosen`` tools every answer gets each of them. Otherwise (``auto``) the answer ``pick``
    (``(variant.key, cache)``, e.g. the prediction's pick), or else the one with the longest context,
    gets its format's default recipes in full, and every other answer one shell line.
    """
    ok = [f for f in fits if f.max_seq_len]
    if not ok:
        return ""
    specs = [(f, spec_for(f.variant, max_seq_len=f.max_seq_len, cache=f.cache, split=f.split, runtime=runtime)) for f in ok]
    out: list[str] = []
    if chosen:
        for f, spec in specs:
            out.append(f"{f.variant.label} {f.cache} at {f.max_seq_len} tokens:")
            out += [_indent(render(recipe(spec, tool=t))) for t in chosen]
    else:
        picked = [p for p in specs if pick is not None and (p[0].variant.key, p[0].cache) == pick]
        # the first answer wins a tie: the most precise cache of the first variant
        main_f, main = picked[0] if picked else max(specs, key=lambda p: p[0].max_seq_len)
        why = "the pick" if picked else "the longest context"
        out.append(f"{main_f.variant.label}, {main_f.cache} cache, {main_f.max_seq_len} tokens ({why}):")
        tools = default_tools(main_f.variant.format)
        out += [_indent(render(recipe(main, tool=t))) for t in tools] or [f"  no run recipes for {main_f.variant.format} yet"]
        others = [(f, s) for f, s in specs if f is not main_f and shell_tool(f.variant.format)]
        if others:
            out.append("The other answers, one line each:")
        for f, s in others:
            r = recipe(s, tool=shell_tool(f.variant.format))
            out.append(f"  {f.variant.label} {f.cache}: " + (r.text or "; ".join(r.notes)))
    torch_fits = [f for f in ok if f.variant.format in TORCH_FORMATS]
    if torch_fits:
        out.append(_allocator_line(torch_fits))
    out.append("Other tools: --recipe tabby, webui, script, python, llama.cpp or all.")
    return "\n".join(out)


def _indent(text: str) -> str:
    return "\n".join("  " + ln for ln in text.splitlines())


def front_row_fields(row: dict[str, Any], *, spec_record: dict[str, Any] | None) -> dict[str, str]:
    """``run_command`` (a shell line) and ``tabby_config`` (formats TabbyAPI runs: exl2, EXL3) for one Pareto row.

    ``row`` is a ``report.trial_rows`` dict (variant source, format, label, context, cache mode,
    split label); ``spec_record`` is the study's stored search spec (variants with their locations,
    split with its reserves, runtime settings); without it the row's own fields are used.
    """
    fmt = str(row.get("format") or "")
    loc = None
    rt: dict[str, Any] = {}
    reserve: tuple[int, ...] = ()
    if spec_record:
        rt = dict(spec_record.get("runtime") or {})
        reserve = tuple((spec_record.get("split") or {}).get("reserve_bytes") or ())
        for vr in spec_record.get("variants") or ():
            lrec = dict(vr.get("location") or {})
            lrec["files"] = tuple(lrec.get("files") or ())
            cand = Location(**lrec)
            if vr.get("format") == fmt and cand.display == row.get("variant"):
                loc = cand
                break
    path = model_path(loc, fmt=fmt) if loc is not None else str(row.get("variant") or "")
    try:
        spec = RunSpec(fmt=fmt, label=str(row.get("label") or ""), model_path=path, max_seq_len=int(row["max_seq_len"]),
                       cache=str(row.get("cache_mode")), split=split_from_label(str(row.get("split")), reserve_bytes=reserve),
                       batch_size=int(rt.get("batch_size", 1)), chunk_len=int(rt.get("chunk_len", 2048)),
                       flash_attn=bool(rt.get("flash_attn", False)), n_gpu_layers=rt.get("n_gpu_layers"))
    except (ValueError, TypeError, KeyError, BadOptionError):
        return {"run_command": "", "tabby_config": ""}
    tool = shell_tool(fmt)
    run = recipe(spec, tool=tool) if tool else None
    tabby = recipe(spec, tool="tabby") if "tabby" in tools_for(fmt) else None
    return {"run_command": run.text if run else "", "tabby_config": tabby.text if tabby else ""}


def add_recipes(front: Sequence[dict[str, Any]], *, spec_record: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The Pareto rows of a study with their ``run_command`` and ``tabby_config`` (see :func:`front_row_fields`)."""
    return [{**r, **front_row_fields(r, spec_record=spec_record)} for r in front]
