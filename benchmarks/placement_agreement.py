"""Manual-split placement agreement: exl2opt against ExLlamaV2 0.3.2's own ``set_device_map`` on CPU.

For random cases (model shape, bpw, 2-4 devices with random ``gpu_split`` allocations around the
weights per device, context, cache mode, batch size, chunk length, flash-attn on/off) both place
the model; a case agrees when both refuse, or both put every module on the same device. The
library side runs with a stub extension and a no-op device context (``tests/placement_oracle.py``,
shared with ``tests/test_placement_library.py``). Needs torch and exllamav2 0.3.2; CPU only.

Run: python benchmarks/placement_agreement.py [N_CASES] [SEED]
"""

from __future__ import annotations

import collections
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from placement_oracle import compare, random_cases, write_placement_models  # noqa: E402
from plan_throughput import _machine  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 2026
    print(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_placement_models(Path(tmp))
        cases = random_cases(random.Random(seed), dirs, n)
        per_model: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        by: collections.Counter[str] = collections.Counter()
        t0 = time.perf_counter()
        for case in cases:
            lib, ours = compare(dirs[(case.model, case.bits)], case)
            outcome = "refused" if lib is None else f"placed on {len(set(lib.values()))}"
            agree = lib == ours
            per_model[case.model]["agree" if agree else "DIFFER"] += 1
            per_model[case.model][outcome] += 1
            by[f"{len(case.gpu_split)} devices, flash-attn {'on' if case.flash_attn else 'off'}: "
               f"{'agree' if agree else 'DIFFER'}"] += 1
        dt = time.perf_counter() - t0
    total = sum(c["agree"] for c in per_model.values())
    print(f"cases: {n} (seed {seed}), {len(dirs)} model dirs, {dt:.1f} s")
    print(f"{'model':<16} {'cases':>5} {'agree':>5} {'differ':>6}  outcomes (library)")
    for model, c in sorted(per_model.items()):
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("agree", "DIFFER"))
        print(f"{model:<16} {c['agree'] + c['DIFFER']:>5} {c['agree']:>5} {c['DIFFER']:>6}  {outcomes}")
    for k, v in sorted(by.items()):
        print(f"  {k}: {v}")
    print(f"agreement: {total} of {n} cases module for module")


if __name__ == "__main__":
    main()
