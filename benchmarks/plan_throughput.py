"""Throughput of the VRAM model: configurations evaluated per second over a 70B grid, and fit's compute.

Builds a header-only Llama-3-70B-shaped exl2 variant (synthesized, 4.0 bpw / h6) in a temp dir,
then evaluates variant x contexts x cache modes x splits (1200 configurations) with
``optimizer.space.evaluate`` and prints configurations per second (median of several rounds; the
per-(context, cache, runtime) plan memo is cleared before each round, the per-variant module table
is built once, as in a real run). Then times what ``exl2opt fit`` computes for ten 70B-shaped
variants (2.5 to 8.0 bpw): for each variant and each of the five cache modes the largest context
that fits, plus the default-context line, starting from freshly discovered variants (so the
per-variant grouping of ~3000 tensors is included). Pure CPU, no GPU, no network.

Run: python benchmarks/plan_throughput.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from optimizer.formats import RuntimeOptions, exl2_rules
from optimizer.formats.exl2_synth import synthesize
from optimizer.safetensors_header import write_header_only
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, evaluate, max_context
from optimizer.units import parse_size
from optimizer.variant import Variant
from optimizer.vram import Split

LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
}
ROUNDS = 7
FIT_BITS = (2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 8.0)
CACHES = ["fp16", "fp8", "q8", "q6", "q4"]


def _variant(root: Path, bits: float) -> Variant:
    d = root / f"Llama-3-70B-{bits}bpw-h6"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_70B))
    write_header_only(d / "output.safetensors", synthesize(LLAMA3_70B, bits=bits, head_bits=6))
    (variant,) = discover_local(d)
    return variant


def throughput(variant: Variant) -> None:
    contexts = [2048 * k for k in range(1, 49)]  # 2k .. 96k
    splits = [Split(mode="single"), Split(mode="auto", n_devices=2), Split(mode="auto", n_devices=4),
              Split(mode="manual", gpu_split=(20.0, 24.0)), Split(mode="manual", gpu_split=(16.0, 16.0, 16.0))]
    budgets = {1: Budget(per_device=(parse_size("80GB"),)), 2: Budget(per_device=(parse_size("24GB"),)),
               3: Budget(per_device=(parse_size("24GB"),)), 4: Budget(per_device=(parse_size("24GB"),))}
    configs = [Configuration(variant=variant, max_seq_len=c, cache=m, split=s)
               for s in splits for m in CACHES for c in contexts]
    rt = RuntimeOptions()
    evaluate(config=configs[0], budget=budgets[1], runtime=rt)  # warm: arch parse and module table
    times = []
    for _ in range(ROUNDS):
        exl2_rules._plan.cache_clear()
        t0 = time.perf_counter()
        fits = 0
        for cfg in configs:
            fits += evaluate(config=cfg, budget=budgets[cfg.split.n_devices], runtime=rt).fits
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    print(f"model: Llama-3-70B shape, {len(variant.tensors)} tensors, 80 layers")
    print(f"configurations: {len(configs)} ({fits} fit), median of {ROUNDS} rounds {dt * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"throughput: {len(configs) / dt:,.0f} configurations/s ({dt / len(configs) * 1e6:.0f} us each; "
          f"range {len(configs) / max(times):,.0f}-{len(configs) / min(times):,.0f})")


def fit_compute(root: Path) -> None:
    budget = Budget(per_device=(parse_size("48GB"),))
    rt = RuntimeOptions()
    times = []
    for r in range(3):
        variants = [_variant(root / f"r{r}", bits) for bits in FIT_BITS]  # fresh: no memo holds them
        t0 = time.perf_counter()
        for v in variants:
            default = exl2_rules.default_context(v)
            evaluate(config=Configuration(variant=v, max_seq_len=default, cache="fp16", split=Split()), budget=budget,
                     runtime=rt)
            for cache in CACHES:
                max_context(variant=v, cache=cache, split=Split(), budget=budget, runtime=rt)
        times.append(time.perf_counter() - t0)
    print(f"fit compute, {len(FIT_BITS)} 70B-shaped variants x {len(CACHES)} cache modes on one 48 GB GPU "
          f"(incl. grouping their tensors): median {statistics.median(times) * 1e3:.1f} ms of 3 runs "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")


def _machine() -> str:
    """CPU model and core count, e.g. ``Intel(R) Xeon(R) Processor, 2 cores``."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"


def main() -> None:
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for r in range(3):
            (root / f"r{r}").mkdir()
        throughput(_variant(root, 4.0))
        fit_compute(root)


if __name__ == "__main__":
    main()
