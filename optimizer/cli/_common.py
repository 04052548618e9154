"""Option parsing shared by every command: sizes, splits, context lists, cache lists, sources.

Each helper turns raw option text into a frozen library object or raises a typed usage error.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from optimizer.errors import BadOptionError

if TYPE_CHECKING:  # the library is imported by the functions below, not at start-up (``--help``)
    from optimizer.sources import HubOptions
    from optimizer.space import Budget
    from optimizer.vram import Split


def in_range(option: str, lo: int, hi: int) -> Callable[[Optional[int]], Optional[int]]:
    """A typer callback refusing an integer option outside ``[lo, hi]`` with one line (exit 2)."""
    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not lo <= value <= hi:
            shown = value if abs(value) < 10**15 else ("a larger number" if value > 0 else "a smaller number")
            raise BadOptionError(f"{option} must be between {lo} and {hi}, got {shown}")
        return value

    return check


ModelOpt = typer.Option(..., "--model", "-m", metavar="SRC",
                         help="Local dir, dir of variant dirs, or Hub repo (org/name[@revision]). Repeatable.")
VramOpt = typer.Option(..., "--vram", metavar="SIZE",
                        help="VRAM per GPU: 15GB (10^9 B), 15GiB (2^30 B), 15000MiB, or a per-GPU list 24GB,24GB.")
GpusOpt = typer.Option(
    None, "--gpus",
    help="Number of GPUs. exl2: autosplit as ExLlamaV2 load_autosplit does. EXL3: exllamav3's layer split "
         "(model.load reserve_per_device). GGUF: llama.cpp layer split, even tensor_split.",
)
GpuSplitOpt = typer.Option(
    None, "--gpu-split",
    help="Manual split. exl2: GiB of weights per GPU, as ExLlamaV2's gpu_split (e.g. 10,15). EXL3: GiB per GPU, "
         "exllamav3's use_per_device. "
         "GGUF: llama.cpp tensor_split proportions of the offloaded layers (10,15 = 40%/60%).",
)
MarginOpt = typer.Option(
    None, "--margin",
    help="Safety margin kept free on every GPU, one size or a per-GPU list (0 turns it off). Default: from how "
         "uncertain the overhead is (1.5 GiB less the assumed overhead, none with --overhead); the output says which.",
)
ReserveOpt = typer.Option(
    None, "--reserve",
    help="exl2 autosplit (--gpus 2+): VRAM kept free on each GPU while loading (ExLlamaV2 load_autosplit reserve_vram, "
         "TabbyAPI autosplit_reserve): one size or a per-GPU list, e.g. 1GiB,0. Default 192MiB on GPU 0, 64MiB on the others "
         "(EXL3: exllamav3's reserve_per_device, default 0.5GiB each).",
)
CtxOpt = typer.Option(
    "auto", "--ctx", help="Context lengths, comma-separated (8192,16k), or 'auto' (powers of two up to the model's default)."
)
CacheOpt = typer.Option(None, "--cache", help="Cache modes, comma-separated (exl2: fp16,fp8,q8,q6,q4; EXL3: fp16 or "
                        "k<bits>v<bits> such as k4v6; GGUF: f16,q8_0,...). Default: each format's modes.")
FormatOpt = typer.Option(None, "--format", help="Only variants of these formats, comma-separated (exl2, exl3, gguf). "
                         "Default: every format found.")
OverheadOpt = typer.Option(None, "--overhead", help="CUDA context + runtime overhead per GPU (default: the figure "
                           "`exl2opt calibrate` stored for this GPU, else 1GiB for exl2, 400MiB for EXL3, 512MiB for GGUF).")
ChunkOpt = typer.Option(2048, "--chunk", help="Prompt chunk length in tokens (ExLlamaV2 max_input_len).",
                        callback=in_range("--chunk", 1, 1 << 20))
BatchOpt = typer.Option(1, "--batch", help="Batch size (cache batch and config.max_batch_size).",
                        callback=in_range("--batch", 1, 4096))
FlashOpt = typer.Option(
    False, "--flash-attn/--no-flash-attn", help="Assume flash-attention (Ampere+). Without it (e.g. T4), SDPA copies K/V per head."
)
OfflineOpt = typer.Option(False, "--offline", help="Use only cached Hub metadata; no network.")
#: llama.cpp's own limit is the layer count + 1; more than this is a typo, not a model.
MAX_GPU_LAYERS = 100000
_check_n_gpu_layers = in_range("--n-gpu-layers", 0, MAX_GPU_LAYERS)


def check_output_file(path: Optional[Path], *, option: str) -> None:
    """Refuse an output path that is a directory (or under a file) before any work is done."""
    if path is None:
        return
    if path.is_dir():
        raise BadOptionError(f"{option} {path} is a directory; give a file name such as {path / 'plan.csv'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise BadOptionError(f"{option} {path}: {parent} is a file, not a directory")


NGpuLayersOpt = typer.Option(
    None, "--n-gpu-layers", callback=_check_n_gpu_layers,
    help="GGUF only: layers llama.cpp offloads to the GPUs (output layer first, then the last repeating "
         "layers); default all. Ignored by exl2.",
)


def budget_from(*, vram: str, overhead: Optional[str], margin: Optional[str] = None) -> Budget:
    """``--vram``, ``--overhead`` and ``--margin`` to a :class:`Budget` (bytes)."""
    from optimizer.space import Budget
    from optimizer.units import parse_sizes

    per = parse_sizes(vram)
    ov = parse_sizes(overhead, allow_zero=True) if overhead else None
    mg = parse_sizes(margin, allow_zero=True) if margin else None
    for what, vals in (("--overhead", ov), ("--margin", mg)):
        if vals is not None and len(vals) not in (1, len(per)):
            raise BadOptionError(f"{what} lists {len(vals)} GPUs but --vram lists {len(per)}")
    from optimizer.calibration import choose_overhead  # stored per-GPU calibration, else the format default

    choice = choose_overhead(explicit=ov)
    return Budget(per_device=per, overhead=choice.per_device, margin=mg, overhead_note=choice.note)


def split_from(*, gpus: Optional[int], gpu_split: Optional[str], budget: Budget, reserve: Optional[str] = None) -> Split:
    """``--gpus`` / ``--gpu-split`` / ``--reserve`` (and a per-GPU ``--vram`` list) to a :class:`Split`."""
    from optimizer.units import parse_sizes
    from optimizer.vram import Split

    if gpus is not None and gpu_split is not None:
        raise BadOptionError("give --gpus or --gpu-split, not both")
    if reserve is not None and gpu_split is not None:
        raise BadOptionError("--reserve applies to autosplit only, not to a --gpu-split")
    n_listed = len(budget.per_device)
    if gpu_split is not None:
        from optimizer.units import MAX_DEVICES, shown_value

        shown = shown_value(gpu_split)
        items = gpu_split.split(",", MAX_DEVICES)
        if len(items) > MAX_DEVICES:
            raise BadOptionError(f"invalid --gpu-split {shown}: more than {MAX_DEVICES} GPUs (as --gpus)")
        try:
            parts = tuple(float(x) for x in items)
        except ValueError:
            raise BadOptionError(f"invalid --gpu-split {shown}: expected GiB per GPU, e.g. 10,15") from None
        if not parts or any(not (0 < p < 100000) for p in parts):
            raise BadOptionError(f"invalid --gpu-split {shown}: every entry must be a positive number of GiB below 100000")
        if n_listed not in (1, len(parts)):
            raise BadOptionError(f"--vram lists {n_listed} GPUs but --gpu-split lists {len(parts)}")
        return Split(mode="manual", gpu_split=parts)
    n = gpus if gpus is not None else n_listed
    if n < 1 or n > 64:
        raise BadOptionError(f"--gpus must be between 1 and 64, got {n if abs(n) < 10**12 else 'a larger number'}")
    if n_listed not in (1, n):
        raise BadOptionError(f"--vram lists {n_listed} GPUs but --gpus is {n}")
    if reserve is not None and n == 1:
        raise BadOptionError("--reserve applies to autosplit only: give it with --gpus 2 or more (or a per-GPU --vram list)")
    if n == 1:
        return Split(mode="single")
    if reserve is None:
        return Split(mode="auto", n_devices=n)
    per = parse_sizes(reserve, allow_zero=True)
    if len(per) not in (1, n):
        raise BadOptionError(f"--reserve lists {len(per)} GPUs but there are {n}")
    return Split(mode="auto", n_devices=n, reserve_bytes=per * n if len(per) == 1 else per)


def parse_contexts(text: str) -> Optional[tuple[int, ...]]:
    """``auto`` -> None; ``4096,8k,32K`` -> (4096, 8192, 32768)."""
    if text.strip().lower() == "auto":
        return None
    from optimizer.units import shown_value

    out = []
    parts = text.split(",", 256)
    if len(parts) > 256:
        raise BadOptionError(f"invalid --ctx {shown_value(text)}: more than 256 context lengths")
    for part in parts:
        p = part.strip().lower()
        mult = 1024 if p.endswith("k") else 1
        p = p[:-1] if p.endswith("k") else p
        if len(p) > 12:
            raise BadOptionError(f"invalid --ctx value {shown_value(part)}: must be between 1 and 67108864 tokens")
        try:
            n = int(p) * mult
        except ValueError:
            raise BadOptionError(f"invalid --ctx {shown_value(text)}: expected token counts such as 4096,8192 or 'auto'") from None
        if not 1 <= n <= 1 << 26:
            raise BadOptionError(f"invalid --ctx value {shown_value(part)}: must be between 1 and 67108864 tokens")
        out.append(n)
    return tuple(sorted(set(out)))


def filter_formats(variants: list[Any], text: Optional[str]) -> list[Any]:
    """Keep the variants whose format ``--format`` names (None keeps all).

    Raises:
        BadOptionError: a name that is not a registered format, or no variant left.
    """
    if text is None:
        return variants
    from optimizer.formats import FORMATS

    wanted = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [w for w in wanted if w not in FORMATS]
    if not wanted or bad:
        raise BadOptionError(f"invalid --format {text[:40]!r}: choose from {', '.join(FORMATS)}")
    kept = [v for v in variants if v.format in wanted]
    if not kept:
        found = ", ".join(sorted({v.format for v in variants})) or "none"
        raise BadOptionError(f"--format {','.join(wanted)}: no such variant among the models (formats found: {found})")
    return kept


def parse_caches(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """``fp16,q4`` -> ("fp16", "q4"); None keeps every mode of the format."""
    if text is None:
        return None
    parts = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))  # once each, in order
    if not parts:
        raise BadOptionError("--cache is empty")
    if len(parts) > 64:
        raise BadOptionError("--cache lists more than 64 cache modes")
    return parts


def hub_options(*, offline: bool) -> HubOptions:
    """Hub settings from the environment. The token is read here and never echoed."""
    from optimizer.sources import HubOptions

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    off = offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return HubOptions(
        endpoint=os.environ.get("HF_ENDPOINT") or None,
        token=token,
        cache_dir=os.environ.get("EXL2OPT_CACHE") or None,
        offline=off,
    )
