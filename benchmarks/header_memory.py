"""Peak memory and time of reading hostile headers, as a multiple of the header size.

Prints one line per input: header bytes, peak traced memory (tracemalloc, so Python allocations
only) as MB and as a multiple of the header, wall time without tracing, and the outcome. Inputs:
the worst families for the streaming safetensors reader (many tiny entries, 8-dimension shapes,
escaped keys, metadata of strings or of empty lists) at the largest size the caps allow, and the
red-team GGUF header with ``block_count = 10^8``. docs/reliability.md quotes its output.

Run: ``PYTHONPATH=. python benchmarks/header_memory.py [--scale 0.1]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import contextlib

from optimizer.errors import Exl2optError  # noqa: E402
from optimizer.formats.gguf import read_header  # noqa: E402
from optimizer.safetensors_header import MAX_HEADER_BYTES, MAX_TENSORS, parse_header_json  # noqa: E402


def _entries(n: int, fmt: bytes) -> bytes:
    return b"{" + b",".join(fmt % (i, i, i + 1) for i in range(n)) + b"}"


def cases(scale: float) -> dict[str, tuple[bytes, Callable[[bytes], object]]]:
    n = int(MAX_TENSORS * scale)
    st = parse_header_json
    from gguf_raw import U64, gguf_bytes, tiny_llama_kv, tiny_llama_tensors

    def gguf(raw: bytes) -> object:
        return read_header(lambda o, k: raw[o:o + k], name="evil.gguf")

    lists = int((MAX_HEADER_BYTES - 64) * scale) // 3
    return {
        f"{n} entries, short names, no dims": (_entries(n, b'"%x":{"dtype":"U8","shape":[],"data_offsets":[%d,%d]}'),
                                               lambda r: st(r, name="h")),
        f"{n} entries, 8 dims": (_entries(n, b'"%x":{"dtype":"U8","shape":[1,1,1,1,1,1,1,1],"data_offsets":[%d,%d]}'),
                                 lambda r: st(r, name="h")),
        f"{n} entries, escaped keys": (_entries(n, b'"\\u0074%x":{"dtype":"U8","shape":[],"data_offsets":[%d,%d]}'),
                                       lambda r: st(r, name="h")),
        f"{MAX_TENSORS + 1} entries (over the cap), escaped": (
            _entries(MAX_TENSORS + 1, b'"\\u0074%x":{"dtype":"U8","shape":[],"data_offsets":[%d,%d]}'),
            lambda r: st(r, name="h")),
        f"{lists} empty lists in __metadata__": (b'{"__metadata__":{"a":' + b"[]," * (lists - 1) + b"[]}}",
                                                lambda r: st(r, name="h")),
        f"{lists // 4} metadata strings": (
            b'{"__metadata__":{' + b",".join(b'"%x":""' % i for i in range(lists // 4)) + b"}}",
            lambda r: st(r, name="h")),
        "GGUF block_count=10^8 (1 kB)": (gguf_bytes(tiny_llama_kv(block_count=(U64, 10**8)), tiny_llama_tensors()), gguf),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the caps to use (1.0 = worst case)")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    for label, (raw, fn) in cases(args.scale).items():
        t0 = time.perf_counter()
        try:
            fn(raw)
            outcome = "accepted"
        except Exl2optError as e:
            outcome = "refused: " + str(e)[:70]
        wall = time.perf_counter() - t0
        tracemalloc.start()
        with contextlib.suppress(Exl2optError):
            fn(raw)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"{label}: {len(raw) / 1e6:.1f} MB header, peak {peak / 1e6:.1f} MB = {peak / len(raw):.1f}x, "
              f"{wall:.2f} s, {outcome}")


if __name__ == "__main__":
    main()
