"""EXL3 run recipes: Python on exllamav3's API, and exllamav3's example chat script.

Checked against exllamav3 **1.6.5** (the PyPI wheel, 2026-11-29): ``Config.from_directory``,
``Model.from_config``, ``Cache(model, max_num_tokens, layer_type, k_bits, v_bits)`` and
``Model.load(device=..., use_per_device=..., reserve_per_device=..., max_chunk_size=...)``
(``model/model.py``); ``model_init.add_args`` / ``init`` (``-m``, ``-gs`` GB per device or ``auto``,
``-cs`` cache tokens, ``-cq`` ``k,v`` bits, ``-chunk_size``, default 4096, so the recipe always passes
it); and the repository's ``examples/chat.py`` (``-mode raw``), which loads through ``model_init``.

The ``Cache`` is created *before* ``model.load``: exllamav3 allocates cache layers while each attention
module loads; a cache made afterwards has no tensors. ``model_init`` always layer-splits over the
visible GPUs (0.5 GiB reserve each) unless ``-gs`` is given, so a one-GPU answer needs
``CUDA_VISIBLE_DEVICES``. TabbyAPI's ``config.yml`` block is ``optimizer.recipes.exl3_tabby`` (checked
against TabbyAPI ``main`` at ``e632af4``). text-generation-webui has an EXL3 loader too, but its option
names have not been checked here, so no recipe is printed for it rather than a guessed one.

``DEFAULT`` (what ``fit`` prints without ``--recipe``): the TabbyAPI block, because TabbyAPI calls itself "the official
API backend server for ExllamaV3" (its README at ``e632af4``; most of its 2026 commits are by exllamav3's
author), plus the example-script line, which
needs nothing but a clone of exllamav3 (as for exl2).
"""

from __future__ import annotations

from collections.abc import Callable

from optimizer.allocator import ENV, EXPANDABLE
from optimizer.formats.exl3 import cache_mode
from optimizer.formats.exl3_place import DEFAULT_RESERVE_BYTES, reserves_for
from optimizer.formats.exl3_rules import load_chunk
from optimizer.recipes import Recipe, RunSpec, num, sh_join, unsupported
from optimizer.recipes.exl3_tabby import tabby
from optimizer.vram import GIB, Split

PYTHON = "Python, exllamav3 1.6.5"
SCRIPT = "exllamav3 1.6.5 examples/chat.py (run in a clone of the exllamav3 repository)"
_ENV_WORD = f"{ENV}={EXPANDABLE}"


def _custom_reserves(split: Split) -> tuple[int, ...] | None:
    """The autosplit reserves (bytes per GPU) when they are not exllamav3's default 0.5 GiB each, else None."""
    reserves = reserves_for(split, split.n_devices)
    return None if reserves == (DEFAULT_RESERVE_BYTES,) * split.n_devices else reserves


def load_call(split: Split, chunk_len: int) -> str:
    """The ``model.load`` call for a split (``max_chunk_size`` only when not the default 2048;
    ``reserve_per_device`` in GiB only when not exllamav3's default)."""
    chunk = f"max_chunk_size={chunk_len}" if chunk_len != 2048 else ""
    if split.mode == "single":
        return f'model.load(device="cuda:0"{", " + chunk if chunk else ""})'
    if split.mode == "manual":
        return f"model.load(use_per_device=[{', '.join(num(g) for g in split.gpu_split)}]{', ' + chunk if chunk else ''})"
    reserves = _custom_reserves(split)
    args = [f"reserve_per_device=[{', '.join(num(b / GIB) for b in reserves)}]"] if reserves else []
    return f"model.load({', '.join(args + ([chunk] if chunk else []))})"


def run_recipe(*, cache: str, max_seq_len: int, split: Split, batch_size: int = 1, chunk_len: int | None = None) -> str:
    """The configuration as one line of Python (after the imports): config, model, cache, load."""
    del batch_size  # one cache pool serves every sequence (``max_num_tokens``)
    chunk = load_chunk(chunk_len=chunk_len or 2048, max_seq_len=max_seq_len)
    return (f"config = Config.from_directory(model_dir); model = Model.from_config(config); "
            f"cache = Cache(model, max_num_tokens={max_seq_len}, {cache_mode(cache).layer_call()}); "
            f"{load_call(split, chunk)}")


def python(spec: RunSpec) -> Recipe:
    """Python lines: allocator setting, imports, config, the cache before the load."""
    mode = cache_mode(spec.cache)
    layer = "CacheLayer_quant" if mode.quantized else "CacheLayer_fp16"
    text = "\n".join([
        f"import os; os.environ.setdefault({ENV!r}, {EXPANDABLE!r})  # before torch is imported",
        f"from exllamav3 import Cache, Config, Model; from exllamav3.cache import {layer}",
        f"config = Config.from_directory({spec.model_path!r}); model = Model.from_config(config)",
        f"cache = Cache(model, max_num_tokens={spec.max_seq_len}, {mode.layer_call()})",
        load_call(spec.split, load_chunk(chunk_len=spec.chunk_len, max_seq_len=spec.max_seq_len)),
    ])
    return Recipe(tool="python", title=PYTHON, text=text, kind="python")


def script(spec: RunSpec) -> Recipe:
    """exllamav3's ``examples/chat.py`` line (``model_init`` flags)."""
    mode = cache_mode(spec.cache)
    cq = ["-cq", f"{mode.k_bits},{mode.v_bits}"] if mode.quantized else []
    prefix: list[str] = []
    notes = ["-mode picks the prompt format: raw works for any model (llama3, chatml... for chat templates)"]
    if spec.split.mode == "manual":
        gs = ["-gs", ",".join(num(g) for g in spec.split.gpu_split)]
    elif spec.split.mode == "auto" and _custom_reserves(spec.split):
        return unsupported("script", "examples/chat.py cannot set the autosplit reserve (model_init keeps 0.5 GiB "
                                     "per GPU); use the Python or TabbyAPI recipe")
    else:
        gs = []
        if spec.split.mode == "single":
            prefix = ["CUDA_VISIBLE_DEVICES=0"]
            notes.append("model_init autosplits even on one GPU, keeping 0.5 GiB free (model.load(device=...) does not)")
    argv = [*prefix, _ENV_WORD, "python", "examples/chat.py", "-m", spec.model_path, "-mode", "raw",
            "-cs", str(spec.max_seq_len), *cq, *gs, "-chunk_size",
            str(load_chunk(chunk_len=spec.chunk_len, max_seq_len=spec.max_seq_len))]
    return Recipe(tool="script", title=SCRIPT, text=sh_join(argv), kind="shell", notes=tuple(notes))


RECIPES: dict[str, Callable[[RunSpec], Recipe]] = {"tabby": tabby, "script": script, "python": python}
DEFAULT: tuple[str, ...] = ("tabby", "script")
SHELL_TOOL = "script"
NOT_AVAILABLE = {
    "llama.cpp": "llama.cpp does not load EXL3 quants (it runs GGUF files)",
    "webui": "text-generation-webui's EXL3 options are not checked by exl2opt yet; see the Python recipe",
}

__all__ = ["RECIPES", "DEFAULT", "SHELL_TOOL", "NOT_AVAILABLE", "python", "script", "load_call", "run_recipe"]
