"""exl2 run recipes: TabbyAPI, text-generation-webui, exllamav2's example script, Python.

Option names were checked against these sources (read with git, 2026-11-29):

* **TabbyAPI**, branch ``exl2-checkpoint`` at ``79126f904c2e`` (2026-06-27): ``config_sample.yml``,
  ``common/config_models.py``, ``backends/exllamav2/model.py``, ``main.py``. TabbyAPI's ``main``
  removed the ExLlamaV2 backend in ``c8b9a8f`` (2026-07-14) and keeps exl2 on that branch only.
  ``cache_mode`` takes ``FP16``/``Q8``/``Q6``/``Q4`` for exl2 (no FP8); ``gpu_split`` is GiB per GPU
  handed to ``model.load``; ``autosplit_reserve`` is MiB per GPU (default ``[96]``, where ExLlamaV2's
  own default, which the VRAM model uses, is 192 MiB then 64 MiB); with flash attention (Ampere+)
  the cache holds ``cache_size`` tokens, without it ``max_seq_len``. TabbyAPI sets
  ``PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`` itself unless ``memory.cuda_malloc_async`` is
  false. With more than one GPU visible and no ``gpu_split`` it always autosplits.
* **text-generation-webui** ``v3.23`` (``910456ba``, 2026-01-08), the last release with the
  ``ExLlamav2_HF`` loader (removed in ``2f08dce7``, v4.0): ``modules/shared.py``,
  ``modules/exllamav2_hf.py``. ``--max_seq_len`` and ``--cache_type`` (fp16, fp8, q8, q6, q4) are
  accepted from v2.0 through v3.23 (v3.x also spells them ``--ctx-size``/``--cache-type``);
  ``--cache_8bit``/``--cache_4bit`` were deprecated in v2.0 and removed in April 2025 (``8144e103``).
  The loader keeps ExLlamaV2's batch of 1, its 2048-token chunk and its default autosplit reserve.
* **exllamav2** ``v0.3.2`` (``6a2d8311``): ``examples/chat.py`` (``-c8``, ``-cq4``, ``-cq6``,
  ``-cq8``, ``-mode``) and ``exllamav2/model_init.py`` (``-m``, ``-l``, ``-gs``, ``-chunk``).
  ``test_inference.py`` only *evaluates* cache modes (``-eq4``...), so the runnable line is ``chat.py``.

``DEFAULT`` (what ``fit`` prints without ``--recipe``): the TabbyAPI block, because TabbyAPI called itself
"the official API backend server for ExllamaV2" (its README until July 2026), plus the example-script
line, because it needs nothing but exllamav2 itself and is what the "Insufficient VRAM" write-up uses.
"""

from __future__ import annotations

from collections.abc import Callable

from optimizer.allocator import ENV, EXPANDABLE
from optimizer.recipes import RELATIVE_NOTE, Recipe, RunSpec, num, parent_and_name, sh_join, unsupported, yaml_str
from optimizer.vram import MIB, Split

TABBY = "TabbyAPI config.yml (branch exl2-checkpoint, 79126f9)"
WEBUI = "text-generation-webui v3.23, ExLlamav2_HF loader"
SCRIPT = "exllamav2 0.3.2 examples/chat.py (run in a clone of the exllamav2 repository)"
PYTHON = "Python, exllamav2 0.3.2"

CACHE_CLASS = {
    "fp16": "ExLlamaV2Cache",
    "fp8": "ExLlamaV2Cache_8bit",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
_TABBY_CACHE = {"fp16": "FP16", "q8": "Q8", "q6": "Q6", "q4": "Q4"}
_SCRIPT_CACHE = {"fp16": [], "fp8": ["-c8"], "q8": ["-cq8"], "q6": ["-cq6"], "q4": ["-cq4"]}
_ENV_WORD = f"{ENV}={EXPANDABLE}"
_ALLOC_NOTE = f"{_ENV_WORD}: the allocator setting exl2opt measures with and its VRAM model assumes (docs/recipes.md)"
# exllamav2 0.3.2's SDPA branch is not causal for prompts (docs/causality.md): without flash-attn the
# recipes select the matmul path, which is what exl2opt measures and its VRAM model sizes.
_NO_SDPA_WORD = "EXLLAMA_NO_SDPA=1"
_NO_SDPA_NOTE = (f"{_NO_SDPA_WORD}: without flash-attn, exllamav2 0.3.2's SDPA path attends to future prompt tokens; "
                 "this selects the causal matmul path exl2opt measures (docs/causality.md)")


def _env_words(spec: RunSpec) -> list[str]:
    """Environment assignments a shell recipe starts with."""
    return [_ENV_WORD] if spec.flash_attn else [_ENV_WORD, _NO_SDPA_WORD]




def _default_reserve(split: Split) -> bool:
    return split.reserve_bytes == Split(mode="auto", n_devices=split.n_devices).reserve_bytes


def load_call(split: Split) -> str:
    """The ExLlamaV2 load call for a split."""
    if split.mode == "single":
        return "model.load()"
    if split.mode == "manual":
        return f"model.load(gpu_split=[{', '.join(num(g) for g in split.gpu_split)}])"
    if _default_reserve(split):
        return "model.load_autosplit(cache)"
    return f"model.load_autosplit(cache, reserve_vram=[{', '.join(str(b) for b in split.reserve_bytes)}])"


def run_recipe(*, cache: str, max_seq_len: int, split: Split, batch_size: int = 1, chunk_len: int | None = None,
               no_sdpa: bool = False) -> str:
    """How to run a configuration with ExLlamaV2 0.3.2, as one line of Python (after
    ``config = ExLlamaV2Config(model_dir)``; settings go on the config before the model is built).

    Autosplit needs a lazy cache created *before* ``load_autosplit``. A single-GPU or manual load
    must come *first*: a non-lazy cache places each layer on ``model.cache_map``, which is empty
    until ``model.load()`` ran (the K/V tensors would silently land in system RAM).
    ``batch_size`` and ``chunk_len`` (``config.max_input_len``, and ``max_attention_size`` as its square,
    as exllamav2's ``-chunk`` flag sets both) are written only when not default. ``no_sdpa`` selects the
    causal matmul attention path (needed without flash-attn; see docs/causality.md).
    """
    cls = CACHE_CLASS.get(cache, cache)
    sets = f"config.max_seq_len = {max_seq_len}; "
    if no_sdpa:
        sets += "config.no_sdpa = True; "
    if chunk_len is not None and chunk_len != 2048:
        sets += f"config.max_input_len = {chunk_len}; config.max_attention_size = {chunk_len} ** 2; "
    batch = ""
    if batch_size != 1:
        sets += f"config.max_batch_size = {batch_size}; "
        batch = f", batch_size={batch_size}"
    sets += "model = ExLlamaV2(config); "
    if split.mode == "auto":
        return f"{sets}cache = {cls}(model, max_seq_len={max_seq_len}{batch}, lazy=True); {load_call(split)}"
    return f"{sets}{load_call(split)}; cache = {cls}(model, max_seq_len={max_seq_len}{batch})"


def python(spec: RunSpec) -> Recipe:
    """Python lines: the allocator setting, the imports, the config and the load in the right order."""
    cls = CACHE_CLASS[spec.cache]
    text = "\n".join([
        f"import os; os.environ.setdefault({ENV!r}, {EXPANDABLE!r})  # before torch is imported",
        f"from exllamav2 import ExLlamaV2, ExLlamaV2Config, {cls}",
        f"config = ExLlamaV2Config({spec.model_path!r})",
        run_recipe(cache=spec.cache, max_seq_len=spec.max_seq_len, split=spec.split, batch_size=spec.batch_size,
                   chunk_len=spec.chunk_len, no_sdpa=not spec.flash_attn),
    ])
    return Recipe(tool="python", title=PYTHON, text=text, kind="python")


def tabby(spec: RunSpec) -> Recipe:
    """A ``config.yml`` block for TabbyAPI's exl2 backend."""
    mode = _TABBY_CACHE.get(spec.cache)
    if mode is None:
        return unsupported("tabby", "TabbyAPI's cache_mode has no FP8 for exl2 (it takes FP16, Q8, Q6 or Q4); "
                                    "use the q8 answer instead")
    if spec.batch_size > 1 and not spec.flash_attn:
        return unsupported("tabby", "without flash attention TabbyAPI runs one sequence at a time (batch 1)")
    notes: list[str] = []
    cache_size = spec.max_seq_len * spec.batch_size
    if cache_size % 256:
        notes.append(f"TabbyAPI rounds cache_size up to a multiple of 256 ({-(-cache_size // 256) * 256} tokens)")
    parent, name = parent_and_name(spec.model_path)
    if not spec.model_path.startswith("/"):
        notes.append(RELATIVE_NOTE.format(what="model_dir", tool="TabbyAPI"))
    lines = [
        "# exl2 needs TabbyAPI's exl2-checkpoint branch (main dropped exl2 in July 2026)",
        "model:",
        f"  model_dir: {yaml_str(parent)}",
        f"  model_name: {yaml_str(name)}",
        f"  max_seq_len: {spec.max_seq_len}",
        f"  cache_size: {cache_size}",
        f"  cache_mode: {mode}",
        f"  chunk_size: {spec.chunk_len}",
    ]
    if spec.batch_size > 1:
        lines.append(f"  max_batch_size: {spec.batch_size}")
    if spec.split.mode == "manual":
        lines += ["  gpu_split_auto: false", f"  gpu_split: [{', '.join(num(g) for g in spec.split.gpu_split)}]"]
    elif spec.split.mode == "auto":
        lines += ["  gpu_split_auto: true",
                  f"  autosplit_reserve: [{', '.join(num(b / MIB) for b in spec.split.reserve_bytes)}]"]
    else:
        notes.append("with more than one GPU visible TabbyAPI autosplits: start it with CUDA_VISIBLE_DEVICES=0")
    lines += ["memory:", "  cuda_malloc_async: false", f"# start TabbyAPI with: {' '.join(_env_words(spec))} ./start.sh"]
    if not spec.flash_attn:
        notes.append(_NO_SDPA_NOTE)
    notes.append("cuda_malloc_async: false keeps TabbyAPI from replacing the allocator setting exl2opt measures with "
                 "(docs/recipes.md)")
    return Recipe(tool="tabby", title=TABBY, text="\n".join(lines), kind="yaml", notes=tuple(notes))


def _split_flags(spec: RunSpec, *, auto: list[str], manual: str) -> list[str] | None:
    """Split flags, or None when the tool cannot express the split (a non-default autosplit reserve)."""
    if spec.split.mode == "manual":
        return [manual, ",".join(num(g) for g in spec.split.gpu_split)]
    if spec.split.mode == "auto":
        return auto if _default_reserve(spec.split) else None
    return []


def webui(spec: RunSpec) -> Recipe:
    """A text-generation-webui command line (ExLlamav2_HF loader)."""
    if spec.batch_size > 1:
        return unsupported("webui", "the ExLlamav2_HF loader allocates a cache for one sequence (batch 1)")
    if spec.chunk_len != 2048:
        return unsupported("webui", "the ExLlamav2_HF loader cannot set the chunk length (it keeps 2048 tokens)")
    split = _split_flags(spec, auto=["--autosplit"], manual="--gpu-split")
    if split is None:
        return unsupported("webui", "webui's --autosplit cannot set the autosplit reserve")
    parent, name = parent_and_name(spec.model_path)
    notes: tuple[str, ...] = (
        (_ALLOC_NOTE,) if spec.model_path.startswith("/") else (_ALLOC_NOTE, RELATIVE_NOTE.format(what="--model-dir", tool="webui")))
    if not spec.flash_attn:
        notes += (_NO_SDPA_NOTE,)
    argv = [*_env_words(spec), "python", "server.py", "--model-dir", parent, "--model", name, "--loader", "ExLlamav2_HF",
            "--max_seq_len", str(spec.max_seq_len), "--cache_type", spec.cache, *split]
    return Recipe(tool="webui", title=WEBUI, text=sh_join(argv), kind="shell", notes=notes)


def script(spec: RunSpec) -> Recipe:
    """exllamav2's ``examples/chat.py`` line."""
    if spec.batch_size > 1:
        return unsupported("script", "examples/chat.py runs one sequence (batch 1)")
    split = _split_flags(spec, auto=["-gs", "auto"], manual="-gs")
    if split is None:
        return unsupported("script", "examples/chat.py cannot set the autosplit reserve")
    chunk = ["-chunk", str(spec.chunk_len)] if spec.chunk_len != 2048 else []
    no_sdpa = [] if spec.flash_attn else ["-nsdpa"]
    argv = [_ENV_WORD, "python", "examples/chat.py", "-m", spec.model_path, "-mode", "raw",
            "-l", str(spec.max_seq_len), *_SCRIPT_CACHE[spec.cache], *split, *chunk, *no_sdpa]
    return Recipe(tool="script", title=SCRIPT, text=sh_join(argv), kind="shell",
                  notes=("-mode picks the prompt format: raw works for any model; `python examples/chat.py -modes` "
                         "lists the others (llama3, chatml...)",))


RECIPES: dict[str, Callable[[RunSpec], Recipe]] = {"tabby": tabby, "webui": webui, "script": script, "python": python}
DEFAULT: tuple[str, ...] = ("tabby", "script")
SHELL_TOOL = "script"
NOT_AVAILABLE = {"llama.cpp": "llama.cpp does not load exl2 quants (it runs GGUF files)"}
