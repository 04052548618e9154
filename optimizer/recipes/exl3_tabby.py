"""The TabbyAPI ``config.yml`` recipe for EXL3 quants (TabbyAPI's exllamav3 backend).

Checked against TabbyAPI ``main`` at ``e632af41eba6`` (2026-08-13), read with git on 2026-11-29:
``common/config_models.py`` (``ModelConfig``, ``MemoryConfig``), ``backends/exllamav3/model.py``
(``ExllamaV3Container.create``, ``create_cache``, ``adjust_chunk_size``, ``load_model_sync``),
``common/model.py``, ``main.py``, ``config_sample.yml``. What it does with the keys this block sets:

* ``model_dir`` / ``model_name``: the model is ``Path(model_dir) / model_name``, resolved from
  TabbyAPI's folder.
* ``cache_mode``: ``FP16`` (``CacheLayer_fp16``), ``Q4``/``Q6``/``Q8`` (read as ``4,4``/``6,6``/``8,8``)
  or ``"k,v"`` with 2-8 bits each (``CacheLayer_quant(k_bits, v_bits)``): every exl2opt EXL3 cache
  mode has a spelling; the block writes the ``"k,v"`` pair.
* ``cache_size`` is ``Cache(max_num_tokens=...)``; pydantic refuses one that is not a multiple of
  256. ``max_seq_len`` is clipped to ``cache_size``; left unset it becomes the model's
  ``max_position_embeddings`` and ``cache_size`` follows it (a 128k cache): the block sets both.
* ``chunk_size`` becomes ``max(256, chunk)`` rounded *up* to a multiple of 256 and is passed to
  ``load_gen(max_chunk_size=...)`` and the generator, never cut to the cache: the block writes
  exl2opt's load chunk (at most the cache) and refuses a chunk off the 256 grid.
* splits: with one GPU visible TabbyAPI ignores ``gpu_split``/``autosplit_reserve`` and loads through
  exllamav3's layer split with a 96 MiB reserve (not ``model.load(device=...)``); with several,
  ``gpu_split`` (GiB) is ``use_per_device``, else ``gpu_split_auto`` with ``autosplit_reserve`` (MiB
  per GPU, default ``[96]``: 96 MiB on GPU 0 and exllamav3's 0.5 GiB on the others) is
  ``reserve_per_device``. ``tensor_parallel`` (default false) is exllamav3's TP, which exl2opt refuses.
* ``max_batch_size`` (default 128 for attention models) is passed to ``Cache``, ``load_gen`` and the
  generator; in exllamav3 1.6.5 it sizes recurrent-state slots only, so the K/V cache is unchanged.
* ``memory.cuda_malloc_async`` (default true) overwrites ``PYTORCH_CUDA_ALLOC_CONF`` with
  ``backend:cudaMallocAsync`` before torch is imported.

TabbyAPI at this commit installs exllamav3 **1.4.2** (``pyproject.toml``; it starts with any
version from 1.4.1); exl2opt sizes **1.6.5**. 1.4.1 (the newest source readable here) has the same
cache layers, page size and load options, but its layer split lacks 1.6.5's two checks (room for
the largest measured transient per device, and ``EXL3_AUTOSPLIT_MARGIN_MB``, 256 MiB), so it can
fill a GPU further than exl2opt places it.
"""

from __future__ import annotations

from optimizer.allocator import ENV, EXPANDABLE
from optimizer.formats.exl3 import PAGE_SIZE, cache_mode
from optimizer.formats.exl3_place import AUTOSPLIT_MARGIN_BYTES, reserves_for
from optimizer.formats.exl3_rules import load_chunk
from optimizer.recipes import RELATIVE_NOTE, Recipe, RunSpec, num, parent_and_name, unsupported, yaml_str
from optimizer.vram import MIB

#: TabbyAPI commit whose option names and behaviour the block follows.
TABBY_COMMIT = "e632af41eba6"
#: exllamav3 version that commit installs (its ``pyproject.toml``), and the lowest it starts with.
TABBY_EXLLAMAV3 = "1.4.2"
TABBY_EXLLAMAV3_MIN = "1.4.1"
TABBY = f"TabbyAPI config.yml (main, {TABBY_COMMIT[:7]}, exllamav3 backend)"
#: ``autosplit_reserve`` TabbyAPI uses on a one-GPU machine (MiB), whatever config.yml says.
TABBY_ONE_GPU_RESERVE_MIB = 96

_ENV_WORD = f"{ENV}={EXPANDABLE}"
# One GPU: the reserve caps the budget and the 256 MiB margin is checked against the device; the larger wins.
_KEPT_FREE_MIB = max(TABBY_ONE_GPU_RESERVE_MIB, AUTOSPLIT_MARGIN_BYTES // MIB)


def tabby_cache_mode(cache: str) -> str:
    """The ``cache_mode`` value TabbyAPI reads as exl2opt's EXL3 cache mode (``FP16``, ``4,6``).

    Raises:
        BadOptionError: not an EXL3 cache mode.
    """
    mode = cache_mode(cache)
    return f"{mode.k_bits},{mode.v_bits}" if mode.quantized else "FP16"


def _yaml_cache_mode(cache: str) -> str:
    """``FP16`` plain, as TabbyAPI's sample writes it; a ``k,v`` pair double-quoted so it stays one string."""
    value = tabby_cache_mode(cache)
    return value if value == "FP16" else yaml_str(value)


def _refusal(spec: RunSpec, chunk: int) -> str:
    """Why TabbyAPI cannot run ``spec`` as exl2opt sized it, or ``""``."""
    if spec.max_seq_len % PAGE_SIZE:
        return (f"TabbyAPI's cache_size must be a multiple of {PAGE_SIZE} tokens; "
                f"{spec.max_seq_len} is not (exllamav3 cannot load it either)")
    if chunk % PAGE_SIZE:
        up = max(PAGE_SIZE, -(-chunk // PAGE_SIZE) * PAGE_SIZE)
        return (f"TabbyAPI rounds chunk_size up to a multiple of {PAGE_SIZE} ({up}), more than the {chunk}-token "
                f"chunk exl2opt sized: size it with --chunk {up}")
    return ""


def tabby(spec: RunSpec) -> Recipe:
    """A ``config.yml`` block for TabbyAPI's exllamav3 backend (see the module docstring)."""
    chunk = load_chunk(chunk_len=spec.chunk_len, max_seq_len=spec.max_seq_len)
    why = _refusal(spec, chunk)
    if why:
        return unsupported("tabby", why)
    parent, name = parent_and_name(spec.model_path)
    notes: list[str] = []
    if not spec.model_path.startswith("/"):
        notes.append(RELATIVE_NOTE.format(what="model_dir", tool="TabbyAPI"))
    lines = [
        "model:",
        f"  model_dir: {yaml_str(parent)}",
        f"  model_name: {yaml_str(name)}",
        f"  max_seq_len: {spec.max_seq_len}",
        f"  cache_size: {spec.max_seq_len}",
        f"  cache_mode: {_yaml_cache_mode(spec.cache)}",
        f"  chunk_size: {chunk}",
    ]
    if spec.batch_size > 1:
        lines.append(f"  max_batch_size: {spec.batch_size}")
    start = [_ENV_WORD, "./start.sh"]
    if spec.split.mode == "manual":
        lines += ["  tensor_parallel: false", "  gpu_split_auto: false",
                  f"  gpu_split: [{', '.join(num(g) for g in spec.split.gpu_split)}]"]
    elif spec.split.mode == "auto":
        reserves = reserves_for(spec.split, spec.split.n_devices)
        lines += ["  tensor_parallel: false", "  gpu_split_auto: true",
                  f"  autosplit_reserve: [{', '.join(num(b / MIB) for b in reserves)}]"]
    else:
        start.insert(0, "CUDA_VISIBLE_DEVICES=0")
        notes.append(
            f"on one GPU TabbyAPI loads through exllamav3's layer split, which (1.6.5) refuses to load unless "
            f"{_KEPT_FREE_MIB} MiB stay free above weights, cache and load-time transient: keep --margin at least that")
    lines += ["memory:", "  cuda_malloc_async: false", f"# start TabbyAPI with: {' '.join(start)}"]
    if spec.batch_size == 1:
        notes.append("concurrent requests (up to TabbyAPI's max_batch_size, 128) share the cache_size tokens")
    notes.append(f"TabbyAPI {TABBY_COMMIT[:7]} installs exllamav3 {TABBY_EXLLAMAV3}; exl2opt sizes 1.6.5, whose layer "
                 f"split keeps more room per GPU than {TABBY_EXLLAMAV3_MIN}'s (same cache and options): install 1.6.5 "
                 "in TabbyAPI's venv for this placement")
    notes.append("cuda_malloc_async: false keeps TabbyAPI from replacing the allocator setting exl2opt measures with "
                 "(docs/recipes.md)")
    return Recipe(tool="tabby", title=TABBY, text="\n".join(lines), kind="yaml", notes=tuple(notes))


__all__ = ["TABBY", "TABBY_COMMIT", "TABBY_EXLLAMAV3", "TABBY_EXLLAMAV3_MIN", "TABBY_ONE_GPU_RESERVE_MIB", "tabby",
           "tabby_cache_mode"]
