"""Throughput of the VRAM model: configurations evaluated per second over a 70B grid.

Builds a header-only Llama-3-70B-shaped exl2 variant (synthesized, 4.0 bpw / h6) in a temp dir,
then evaluates variant x contexts x cache modes x splits (>= 1000 configurations) with
``optimizer.space.evaluate`` and prints configurations per second. Pure CPU, no GPU, no network.

Run: python benchmarks/plan_throughput.py
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from optimizer.formats import RuntimeOptions
from optimizer.formats.exl2_synth import synthesize
from optimizer.safetensors_header import write_header_only
from optimizer.sources.local import discover_local
from optimizer.space import Budget, Configuration, evaluate
from optimizer.units import parse_size
from optimizer.vram import Split

LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "Llama-3-70B-4.0bpw-h6"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(LLAMA3_70B))
        write_header_only(d / "output.safetensors", synthesize(LLAMA3_70B, bits=4.0, head_bits=6))
        (variant,) = discover_local(d)
        contexts = [2048 * k for k in range(1, 49)]  # 2k .. 96k
        caches = ["fp16", "fp8", "q8", "q6", "q4"]
        splits = [Split(mode="single"), Split(mode="auto", n_devices=2), Split(mode="auto", n_devices=4),
                  Split(mode="manual", gpu_split=(20.0, 24.0)), Split(mode="manual", gpu_split=(16.0, 16.0, 16.0))]
        budgets = {1: Budget(per_device=(parse_size("80GB"),)), 2: Budget(per_device=(parse_size("24GB"),)),
                   3: Budget(per_device=(parse_size("24GB"),)), 4: Budget(per_device=(parse_size("24GB"),))}
        configs = [Configuration(variant=variant, max_seq_len=c, cache=m, split=s)
                   for s in splits for m in caches for c in contexts]
        rt = RuntimeOptions()
        evaluate(config=configs[0], budget=budgets[1], runtime=rt)  # warm caches (arch parse)
        t0 = time.perf_counter()
        fits = 0
        for cfg in configs:
            fits += evaluate(config=cfg, budget=budgets[cfg.split.n_devices], runtime=rt).fits
        dt = time.perf_counter() - t0
        print(f"model: Llama-3-70B shape, {len(variant.tensors)} tensors, 80 layers")
        print(f"configurations: {len(configs)} ({fits} fit), time {dt:.3f} s")
        print(f"throughput: {len(configs) / dt:,.0f} configurations/s ({dt / len(configs) * 1e6:.0f} us each)")


if __name__ == "__main__":
    main()
