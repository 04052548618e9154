"""Option parsing shared by every command: sizes, splits, context lists, cache lists, sources.

Each helper turns raw option text into a frozen library object or raises a typed usage error.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import typer

from optimizer.errors import BadOptionError

if TYPE_CHECKING:  # the library is imported by the functions below, not at start-up (``--help``)
    from optimizer.sources import HubOptions
    from optimizer.space import Budget
    from optimizer.vram import Split

ModelOpt = typer.Option(..., "--model", "-m", help="Local dir, dir of variant dirs, or Hub repo (org/name[@revision]). Repeatable.")
VramOpt = typer.Option(..., "--vram", help="VRAM per GPU: 15GB (10^9 B), 15GiB (2^30 B), 15000MiB, or a per-GPU list 24GB,24GB.")
GpusOpt = typer.Option(
    None, "--gpus",
    help="Number of GPUs. exl2: autosplit as ExLlamaV2 load_autosplit does. GGUF: llama.cpp layer split, even tensor_split.",
)
GpuSplitOpt = typer.Option(
    None, "--gpu-split",
    help="Manual split. exl2: GiB of weights per GPU, as ExLlamaV2's gpu_split (e.g. 10,15). "
         "GGUF: llama.cpp tensor_split proportions of the offloaded layers (10,15 = 40%/60%).",
)
ReserveOpt = typer.Option(
    None, "--reserve",
    help="exl2 autosplit (--gpus 2+): VRAM kept free on each GPU while loading (ExLlamaV2 load_autosplit reserve_vram, "
         "TabbyAPI autosplit_reserve): one size or a per-GPU list, e.g. 1GiB,0. Default 192MiB on GPU 0, 64MiB on the others.",
)
CtxOpt = typer.Option(
    "auto", "--ctx", help="Context lengths, comma-separated (8192,16k), or 'auto' (powers of two up to the model's default)."
)
CacheOpt = typer.Option(None, "--cache", help="Cache modes, comma-separated (exl2: fp16,fp8,q8,q6,q4). Default: all.")
OverheadOpt = typer.Option(None, "--overhead", help="CUDA context + allocator overhead per GPU (default 400MiB for exl2).")
ChunkOpt = typer.Option(2048, "--chunk", help="Prompt chunk length in tokens (ExLlamaV2 max_input_len).")
BatchOpt = typer.Option(1, "--batch", help="Batch size (cache batch and config.max_batch_size).")
FlashOpt = typer.Option(
    False, "--flash-attn/--no-flash-attn", help="Assume flash-attention (Ampere+). Without it (e.g. T4), SDPA copies K/V per head."
)
OfflineOpt = typer.Option(False, "--offline", help="Use only cached Hub metadata; no network.")
def _check_n_gpu_layers(value: Optional[int]) -> Optional[int]:
    if value is not None and not 0 <= value <= 100000:
        raise BadOptionError(f"--n-gpu-layers must be 0 or more, got {value}")
    return value


NGpuLayersOpt = typer.Option(
    None, "--n-gpu-layers", callback=_check_n_gpu_layers,
    help="GGUF only: layers llama.cpp offloads to the GPUs (output layer first, then the last repeating "
         "layers); default all. Ignored by exl2.",
)


def budget_from(*, vram: str, overhead: Optional[str]) -> Budget:
    """``--vram`` and ``--overhead`` to a :class:`Budget` (bytes)."""
    from optimizer.space import Budget
    from optimizer.units import parse_sizes

    per = parse_sizes(vram)
    ov = parse_sizes(overhead, allow_zero=True) if overhead else None
    return Budget(per_device=per, overhead=ov)


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
        try:
            parts = tuple(float(x) for x in gpu_split.split(","))
        except ValueError:
            raise BadOptionError(f"invalid --gpu-split {gpu_split!r}: expected GiB per GPU, e.g. 10,15") from None
        if not parts or any(not (0 < p < 100000) for p in parts):
            raise BadOptionError(f"invalid --gpu-split {gpu_split!r}: every entry must be a positive number of GiB")
        if n_listed not in (1, len(parts)):
            raise BadOptionError(f"--vram lists {n_listed} GPUs but --gpu-split lists {len(parts)}")
        return Split(mode="manual", gpu_split=parts)
    n = gpus if gpus is not None else n_listed
    if n < 1 or n > 64:
        raise BadOptionError(f"--gpus must be between 1 and 64, got {n}")
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
    out = []
    for part in text.split(","):
        p = part.strip().lower()
        mult = 1024 if p.endswith("k") else 1
        p = p[:-1] if p.endswith("k") else p
        try:
            n = int(p) * mult
        except ValueError:
            raise BadOptionError(f"invalid --ctx {text!r}: expected token counts such as 4096,8192 or 'auto'") from None
        if not 1 <= n <= 1 << 26:
            raise BadOptionError(f"invalid --ctx value {part!r}: must be between 1 and 67108864 tokens")
        out.append(n)
    return tuple(sorted(set(out)))


def parse_caches(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """``fp16,q4`` -> ("fp16", "q4"); None keeps every mode of the format."""
    if text is None:
        return None
    parts = tuple(p.strip().lower() for p in text.split(",") if p.strip())
    if not parts:
        raise BadOptionError("--cache is empty")
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
