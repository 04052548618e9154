"""Start-up time of every ``exl2opt`` command against ``python -c pass`` (paired medians).

Each command runs N times, each run paired with a run of ``python -c pass`` just before it, so a
machine that slows down or speeds up during the measurement moves both alike. Printed per command:
the median of the command's wall time, the median of the baseline, and the median of the paired
differences (the figure the start-up goal is stated in: within 150 ms of ``python -c pass``).
Also lists the heavy modules each command imported. The package's bytecode is compiled first, as
``pip install`` does (an environment with ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every
module on every run).

Run: python benchmarks/startup.py [N]   (default N = 15)
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
COMMANDS: list[list[str]] = [
    ["--help"],
    *([name, "--help"] for name in ("plan", "fit", "search", "worker", "report")),
    ["fit", "-m", str(EXAMPLE), "--vram", "15GB"],
]
HEAVY = ("pydantic", "rich", "optuna", "torch", "numpy", "pandas", "huggingface_hub", "llama_cpp", "exllamav2",
         "optimizer.formats.gguf", "optimizer.study", "optimizer.report")
GOAL_MS = 150.0

_PROBE = """
import io, json, sys, contextlib
from optimizer.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in %r if m in sys.modules)))
"""


def _time(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run of ``cmd``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def paired(cmd: list[str], n: int) -> dict[str, float]:
    """Medians (seconds) of ``cmd`` and the baseline, and of the paired differences, wall and CPU."""
    base = [sys.executable, "-c", "pass"]
    _time(base), _time(cmd)  # warm the page cache
    a, b = [], []
    for _ in range(n):
        b.append(_time(base))
        a.append(_time(cmd))
    med = statistics.median
    return {"wall": med(x[0] for x in a), "base": med(x[0] for x in b),
            "diff": med(x[0] - y[0] for x, y in zip(a, b, strict=True)),
            "cpu_diff": med(x[1] - y[1] for x, y in zip(a, b, strict=True))}


def heavy_modules(args: list[str]) -> list[str]:
    res = subprocess.run([sys.executable, "-c", _PROBE % (HEAVY,), *args], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    return list(json.loads(res.stdout.strip().splitlines()[-1]))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "optimizer")], check=True)
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()} with {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, paired medians of {n} runs each (wall; CPU = user + system)")
    worst = 0.0
    for args in COMMANDS:
        r = paired([sys.executable, "-m", "optimizer", *args], n)
        worst = max(worst, r["diff"])
        shown = " ".join(a for a in args).replace(f"-m {EXAMPLE} --vram 15GB", "<example>")
        print(f"exl2opt {shown:<32} {r['wall'] * 1000:4.0f} ms (python -c pass {r['base'] * 1000:3.0f} ms): "
              f"+{r['diff'] * 1000:3.0f} ms wall, +{r['cpu_diff'] * 1000:3.0f} ms CPU; "
              f"heavy: {', '.join(heavy_modules(args)) or 'none'}")
    verdict = "within" if worst * 1000 <= GOAL_MS else "OVER"
    print("<example> = studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2 --vram 15GB")
    print(f"slowest: +{worst * 1000:.0f} ms wall over python -c pass ({verdict} the {GOAL_MS:.0f} ms goal; "
          "a busy machine inflates wall time, CPU time much less)")


if __name__ == "__main__":
    main()
