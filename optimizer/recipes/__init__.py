"""Run recipes: how to run one answer of ``fit`` (or one Pareto row of ``search``) with the tools people use.

Pure: no I/O, no heavy imports. A :class:`RunSpec` (what to run: the model's path, context, cache mode,
split and runtime settings) becomes a :class:`Recipe` for one tool: a TabbyAPI ``config.yml`` block, a
text-generation-webui command line, an exllamav2 example-script line, Python calls, or, for GGUF,
``llama-server`` and llama-cpp-python. Recipes are keyed by format: each format module
(``optimizer.recipes.exl2``, ``.gguf``, ``.exl3``) maps tool names to recipe functions and names
the upstream versions its option names were checked against (see ``docs/recipes.md``). Adding a format
is a module named by the format's ``FormatSpec.recipes`` (``optimizer.formats``); it provides
``RECIPES`` (tool name -> function of a :class:`RunSpec` returning a :class:`Recipe`), ``DEFAULT``
(the tools ``fit`` prints without ``--recipe``), ``SHELL_TOOL`` (the one-line recipe for other
answers and ``pareto.csv``) and ``NOT_AVAILABLE`` (tool name -> why it cannot run the format).

Quoting: every value that came from outside (paths, repository and branch names) is quoted for its
target language: :func:`sh_quote` for shell lines, :func:`yaml_str` for YAML, ``repr`` for Python. A
tool that cannot express a configuration (TabbyAPI has no FP8 cache, llama.cpp does not load exl2)
gets a recipe with empty ``text`` and a note that says so, never a wrong flag.

The allocator setting (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, see
``optimizer.allocator``) is part of every recipe of a PyTorch-based engine.
"""

from __future__ import annotations

import importlib
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from optimizer.errors import BadOptionError
from optimizer.textsafe import strip_controls
from optimizer.variant import Location, Variant
from optimizer.vram import Split

#: Every tool name ``--recipe`` accepts (besides ``auto`` and ``all``).
TOOLS: tuple[str, ...] = ("tabby", "webui", "script", "python", "llama.cpp")


_TOOL_NAMES = {
    "tabby": "TabbyAPI", "webui": "text-generation-webui", "script": "the engine's example script",
    "python": "Python", "llama.cpp": "llama.cpp (llama-server)",
}


@dataclass(frozen=True)
class RunSpec:
    """One configuration to run, in the engine's own terms.

    Attributes:
        fmt: quant format (``exl2``, ``gguf``...), selects the recipe module.
        label: the variant's short label (``3.0bpw-h6``), for headings only.
        model_path: where the model is on the user's disk: an exl2 directory or a ``.gguf`` file
            (the first part of a split GGUF). For a Hub variant, the folder its ``hf download``
            command writes to.
        max_seq_len: context length in tokens.
        cache: cache mode as exl2opt names it (exl2 ``fp16``/``fp8``/``q8``/``q6``/``q4``; GGUF ``f16``,
            ``q8_0``, ``q8_0/q4_0``...).
        split: how the model is spread over GPUs (:class:`~optimizer.vram.Split`).
        batch_size: sequences per forward (cache batch).
        chunk_len: prompt chunk length in tokens (exl2 ``max_input_len``, llama.cpp ``n_batch``).
        flash_attn: flash attention assumed (GGUF: also forced on by a quantized V cache).
        n_gpu_layers: GGUF layers offloaded to the GPUs, None = all.
    """

    fmt: str
    label: str
    model_path: str
    max_seq_len: int
    cache: str
    split: Split
    batch_size: int = 1
    chunk_len: int = 2048
    flash_attn: bool = False
    n_gpu_layers: int | None = None

    def __post_init__(self) -> None:
        if self.max_seq_len < 1 or self.batch_size < 1 or self.chunk_len < 1:
            raise BadOptionError("a recipe needs a positive context, batch size and chunk length")
        if not self.model_path:
            raise BadOptionError("a recipe needs the model's path")


@dataclass(frozen=True)
class Recipe:
    """How to run a :class:`RunSpec` with one tool.

    Attributes:
        tool: the tool key (one of :data:`TOOLS`).
        title: heading naming the tool and the version whose option names it uses.
        text: what to paste (a shell line, a YAML block or Python lines); empty when the tool cannot
            express this configuration.
        kind: ``"shell"``, ``"yaml"`` or ``"python"``.
        notes: what the reader must know (why ``text`` is empty, what the tool does differently).
    """

    tool: str
    title: str
    text: str
    kind: str
    notes: tuple[str, ...] = ()

    @property
    def supported(self) -> bool:
        return bool(self.text)


def unsupported(tool: str, why: str) -> Recipe:
    """A recipe that says the tool cannot run this configuration, and why."""
    return Recipe(tool=tool, title=_TOOL_NAMES.get(tool, tool), text="", kind="shell", notes=(why,))


# ----- quoting ------------------------------------------------------------------------------------

def sh_quote(value: str) -> str:
    """``value`` as one shell word. Plain text goes through :func:`shlex.quote`; text with characters
    :func:`optimizer.textsafe.strip_controls` would escape (controls, which would also drive the
    terminal, bidi and zero-width marks) uses ``$'...'`` with ``\\xHH``/``\\uHHHH`` escapes (bash >= 4.2,
    zsh, ksh and POSIX sh since 2024), so the printed line is both safe to show and exact to paste."""
    if strip_controls(value) == value:
        return shlex.quote(value)
    out = []
    for ch in value:
        if ch in "\\'":
            out.append("\\" + ch)
        elif strip_controls(ch) != ch:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def sh_join(argv: list[str]) -> str:
    """A command line from words, each quoted with :func:`sh_quote`."""
    return " ".join(sh_quote(a) for a in argv)


def yaml_str(value: str) -> str:
    """``value`` as a YAML double-quoted scalar (valid YAML 1.1 and 1.2): ``\\`` and ``"`` escaped,
    anything non-printable or a YAML line break as ``\\xHH``/``\\uHHHH``/``\\UHHHHHHHH``."""
    out = []
    for ch in value:
        o = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ch not in "\x85\u2028\u2029\ufeff":
            out.append(ch)
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def num(x: float) -> str:
    """A number as the shortest text that reads back the same (``10``, ``15.5``)."""
    return f"{x:g}" if float(x) == float(f"{x:g}") else repr(float(x))


#: Note for a server that resolves a relative model path from its own folder (``tool``, ``what``: the option).
RELATIVE_NOTE = ("the model's path is relative to the folder it was downloaded into, but {tool} resolves {what} "
                 "from its own folder: use the absolute path")


def parent_and_name(path: str) -> tuple[str, str]:
    """A model path split as servers take it: the folder holding the model, and the model's folder name."""
    head, _, tail = path.rstrip("/").rpartition("/")
    return (head or ("/" if path.startswith("/") else ".")), tail


# ----- building specs -----------------------------------------------------------------------------


def model_path(location: Location, *, fmt: str) -> str:
    """Where a variant is on the user's disk: the local path, or for a Hub variant the path its
    ``hf download`` command (:meth:`Location.download_command`) writes it to."""
    if location.kind != "hub":
        return str(location.path or "")
    base = location.local_dir
    if location.subfolder:
        base = f"{base}/{location.subfolder}"
    if location.is_gguf_files:
        base = f"{base}/{location.files[0]}"
    return base


def spec_for(variant: Variant, *, max_seq_len: int, cache: str, split: Split, runtime: Any, absolute: bool = True) -> RunSpec:
    """The :class:`RunSpec` of a configuration. ``runtime`` is a ``RuntimeOptions``. Local paths are made
    absolute (``absolute``), because servers resolve relative paths against their own folders."""
    path = model_path(variant.location, fmt=variant.format)
    if absolute and variant.location.kind != "hub" and path:
        path = os.path.abspath(path)
    return RunSpec(fmt=variant.format, label=variant.label, model_path=path, max_seq_len=max_seq_len, cache=cache,
                   split=split, batch_size=runtime.batch_size, chunk_len=runtime.chunk_len,
                   flash_attn=runtime.flash_attn, n_gpu_layers=runtime.n_gpu_layers)


def split_from_label(label: str, *, reserve_bytes: tuple[int, ...] = ()) -> Split:
    """Inverse of :attr:`Split.label`: ``1gpu``, ``auto:2``, ``10,15``."""
    if label == "1gpu":
        return Split(mode="single")
    if label.startswith("auto:"):
        return Split(mode="auto", n_devices=int(label[5:]), reserve_bytes=reserve_bytes)
    try:
        return Split(mode="manual", gpu_split=tuple(float(x) for x in label.split(",")))
    except ValueError:
        raise BadOptionError(f"unknown split {label!r}") from None


# ----- dispatch -----------------------------------------------------------------------------------


def _module(fmt: str) -> ModuleType | None:
    """The recipe module of ``fmt`` (``FormatSpec.recipes`` in the formats registry), if any."""
    from optimizer.formats import FORMATS

    spec = FORMATS.get(fmt)
    return importlib.import_module(spec.recipes) if spec is not None and spec.recipes else None


def run_line(fmt: str) -> Callable[..., str] | None:
    """The format's one-line Python recipe ``run_recipe(*, cache, max_seq_len, split, batch_size,
    chunk_len)`` (fit's ``run`` column), or None when the format has none."""
    mod = _module(fmt)
    fn = getattr(mod, "run_recipe", None) if mod is not None else None
    return fn if callable(fn) else None


def tools_for(fmt: str) -> tuple[str, ...]:
    """The tools with a recipe for ``fmt``, in display order."""
    mod = _module(fmt)
    return tuple(mod.RECIPES) if mod else ()


def default_tools(fmt: str) -> tuple[str, ...]:
    """What ``--recipe auto`` prints for ``fmt`` (the module's ``DEFAULT``; its docstring says why)."""
    mod = _module(fmt)
    return tuple(mod.DEFAULT) if mod else ()


def shell_tool(fmt: str) -> str:
    """The tool whose recipe is one shell line, for CSV columns (exl2: the example script)."""
    mod = _module(fmt)
    return str(mod.SHELL_TOOL) if mod else ""


def recipe(spec: RunSpec, *, tool: str) -> Recipe:
    """The recipe of ``spec`` for ``tool``; an unsupported recipe (empty text, a note) when the tool has
    none for this format."""
    if tool not in TOOLS:
        raise BadOptionError(f"unknown recipe {tool!r} (choose from auto, all, {', '.join(TOOLS)})")
    mod = _module(spec.fmt)
    if mod is None:
        return unsupported(tool, f"no recipes for the {spec.fmt} format yet")
    fn = mod.RECIPES.get(tool)
    if fn is None:
        return unsupported(tool, str(mod.NOT_AVAILABLE.get(tool, f"{_TOOL_NAMES[tool]} does not run {spec.fmt} quants")))
    result: Recipe = fn(spec)
    return result


def parse_recipe_option(text: str) -> tuple[str, ...]:
    """``--recipe`` text to tool names: ``auto`` (empty tuple: each format's default), ``all``, or a
    comma-separated list of :data:`TOOLS`."""
    parts = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not parts or parts == ("auto",):
        return ()
    if parts == ("all",):
        return TOOLS
    bad = [p for p in parts if p not in TOOLS]
    if bad:
        raise BadOptionError(f"unknown --recipe {bad[0]!r} (choose from auto, all, {', '.join(TOOLS)})")
    return tuple(dict.fromkeys(parts))


def render(r: Recipe, *, indent: str = "  ") -> str:
    """A recipe for the terminal: its title, its text (indented), then its notes."""
    lines = [f"{r.title}:"]
    lines += [indent + ln for ln in r.text.splitlines()] if r.text else []
    lines += [f"{indent}note: {n}" for n in r.notes]
    return "\n".join(lines)
