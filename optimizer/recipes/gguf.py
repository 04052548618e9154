"""GGUF run recipes: llama.cpp's ``llama-server``, llama-cpp-python, text-generation-webui.

Option names were checked against these sources (2026-11-29):

* **llama.cpp** ``tools/server/README.md`` at ``00dc8057`` (generated from ``common/arg.cpp``):
  ``-m``, ``-c``, ``-ctk``/``-ctv`` (f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1),
  ``-fa on|off|auto`` (builds before mid-2025 take a bare ``-fa``), ``-ngl``, ``-sm none|layer``,
  ``-ts`` (proportions), ``-b`` (default 2048), ``-ub`` (default 512), ``-np`` (default auto, which
  also turns on a unified KV buffer), ``--no-kv-unified``. ``--fit`` (on by default in newer
  builds) only adjusts options left unset; every recipe sets the ones that change memory.
* **llama-cpp-python** 0.3.36 (the version installed by ``scripts/install-dev.sh``):
  ``Llama(model_path, n_gpu_layers, split_mode, main_gpu, tensor_split, n_ctx, n_batch, n_ubatch,
  flash_attn, type_k, type_v)``; ``type_k``/``type_v`` take ``llama_cpp.GGML_TYPE_*`` numbers; one
  sequence per context.
* **text-generation-webui** ``v4.7.3`` (``1dcde41d``, 2026-05-03), ``llama.cpp`` loader, which starts
  ``llama-server``: ``--ctx-size``, ``--cache-type`` (fp16, q8_0, q4_0: K and V alike), ``--gpu-layers``
  (a number also passes ``--fit off``), ``--tensor-split``, ``--batch-size``/``--ubatch-size`` (default
  1024 each), ``--parallel``; it always passes ``--flash-attn on``.

``DEFAULT``: ``llama-server``, the server of llama.cpp itself, which webui, and most GGUF front-ends,
start underneath.
"""

from __future__ import annotations

from collections.abc import Callable

from optimizer.formats.gguf import GGML_TYPE_IDS
from optimizer.recipes import Recipe, RunSpec, num, sh_join, unsupported
from optimizer.vram import Split

SERVER = "llama.cpp llama-server (options as of llama.cpp 00dc805)"
PYTHON = "Python, llama-cpp-python 0.3.36"
WEBUI = "text-generation-webui v4.7.3, llama.cpp loader"

#: ``llama_cpp.GGML_TYPE_*`` constants present in llama-cpp-python 0.3.36 (bf16 has none: its number is used).
_PY_TYPE_NAMES = frozenset({"f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"})
_WEBUI_CACHE = {"f16": "fp16", "q8_0": "q8_0", "q4_0": "q4_0"}
#: exl2opt's GGUF rules: ``n_ubatch`` (llama.cpp's and llama-cpp-python's default).
_UBATCH = 512


def _kv(spec: RunSpec) -> tuple[str, str]:
    k, _, v = spec.cache.lower().partition("/")
    return k, v or k


def _flash(spec: RunSpec) -> bool:
    """Flash attention as the memory model assumes it: asked for, or forced by a quantized V cache."""
    return spec.flash_attn or _kv(spec)[1] not in ("f16", "f32", "bf16")


def _ngl(spec: RunSpec) -> str:
    return "999" if spec.n_gpu_layers is None else str(spec.n_gpu_layers)


def _proportions(split: Split) -> list[str]:
    if split.mode == "manual":
        return [num(g) for g in split.gpu_split]
    return ["1"] * max(split.n_devices, 1)


def server(spec: RunSpec) -> Recipe:
    """A ``llama-server`` line."""
    k, v = _kv(spec)
    argv = ["llama-server", "-m", spec.model_path, "-c", str(spec.max_seq_len), "-ctk", k, "-ctv", v,
            "-fa", "on" if _flash(spec) else "off", "-ngl", _ngl(spec)]
    argv += ["-sm", "none"] if spec.split.mode == "single" else ["-sm", "layer", "-ts", ",".join(_proportions(spec.split))]
    argv += ["-np", str(spec.batch_size)] + (["--no-kv-unified"] if spec.batch_size > 1 else [])
    if spec.chunk_len != 2048:
        argv += ["-b", str(spec.chunk_len)]
    notes = ("-c is the whole KV cache: with -np N each of the N slots gets 1/N of it",) if spec.batch_size > 1 else ()
    return Recipe(tool="llama.cpp", title=SERVER, text=sh_join(argv), kind="shell", notes=notes)


def _py_type(t: str) -> str:
    return f"llama_cpp.GGML_TYPE_{t.upper()}" if t in _PY_TYPE_NAMES else str(GGML_TYPE_IDS[t])


def python(spec: RunSpec) -> Recipe:
    """llama-cpp-python's ``Llama(...)``."""
    if spec.batch_size > 1:
        return unsupported("python", "llama-cpp-python's Llama runs one sequence per context (batch 1)")
    k, v = _kv(spec)
    ngl = -1 if spec.n_gpu_layers is None else spec.n_gpu_layers
    if spec.split.mode == "single":
        split = "split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE, main_gpu=0"
    else:
        split = ("split_mode=llama_cpp.LLAMA_SPLIT_MODE_LAYER, "
                 f"tensor_split=[{', '.join(str(float(p)) for p in _proportions(spec.split))}]")
    text = "\n".join([
        "import llama_cpp",
        f"llm = llama_cpp.Llama(model_path={spec.model_path!r}, n_ctx={spec.max_seq_len}, n_gpu_layers={ngl}, {split}, "
        f"type_k={_py_type(k)}, type_v={_py_type(v)}, flash_attn={_flash(spec)}, "
        f"n_batch={spec.chunk_len}, n_ubatch={_UBATCH})",
    ])
    return Recipe(tool="python", title=PYTHON, text=text, kind="python")


def webui(spec: RunSpec) -> Recipe:
    """A text-generation-webui line (llama.cpp loader)."""
    k, v = _kv(spec)
    if k != v or k not in _WEBUI_CACHE:
        return unsupported("webui", f"webui's --cache-type sets K and V alike to fp16, q8_0 or q4_0; it cannot express {spec.cache}")
    head, _, name = spec.model_path.rstrip("/").rpartition("/")
    argv = ["python", "server.py", "--model-dir", head or ".", "--model", name, "--loader", "llama.cpp",
            "--ctx-size", str(spec.max_seq_len), "--cache-type", _WEBUI_CACHE[k], "--gpu-layers", _ngl(spec),
            "--batch-size", str(spec.chunk_len), "--ubatch-size", str(_UBATCH), "--parallel", str(spec.batch_size)]
    notes = []
    if spec.split.mode == "single":
        notes.append("with more than one GPU visible llama-server splits over all of them: start webui with CUDA_VISIBLE_DEVICES=0")
    else:
        argv += ["--tensor-split", ",".join(_proportions(spec.split))]
    if not _flash(spec):
        notes.append("webui always turns flash attention on; the prediction assumed it off (flash attention needs less memory)")
    return Recipe(tool="webui", title=WEBUI, text=sh_join(argv), kind="shell", notes=tuple(notes))


RECIPES: dict[str, Callable[[RunSpec], Recipe]] = {"llama.cpp": server, "python": python, "webui": webui}
DEFAULT: tuple[str, ...] = ("llama.cpp",)
SHELL_TOOL = "llama.cpp"
NOT_AVAILABLE = {
    "tabby": "TabbyAPI does not load GGUF files (its sister project YALS does)",
    "script": "for GGUF the llama.cpp recipe is the script: use --recipe llama.cpp",
}
