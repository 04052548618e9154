"""Start-up time of ``exl2opt --help`` against ``python -c pass`` (median of N runs).

Run: python benchmarks/startup.py [N]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def _median(cmd: list[str], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    base = _median([sys.executable, "-c", "pass"], n)
    helpt = _median([sys.executable, "-m", "optimizer", "--help"], n)
    heavy = subprocess.run(
        [sys.executable, "-c", "import sys, optimizer.cli; print(sorted(m for m in "
         "('torch','exllamav2','optuna','pandas','huggingface_hub','llama_cpp') if m in sys.modules))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    print(f"python -c pass     : {base * 1000:.0f} ms (median of {n})")
    print(f"exl2opt --help     : {helpt * 1000:.0f} ms (median of {n})")
    print(f"overhead           : {(helpt - base) * 1000:.0f} ms")
    print(f"heavy modules imported by the CLI at start-up: {heavy}")


if __name__ == "__main__":
    main()
