"""The simulated GPU of ``benchmarks/search_cost.py``: landscapes, costs, and a cost-counting engine.

Costs (seconds of a GPU held):

    model load        4 s + weight bytes / 1.5 GB/s              (disk -> GPU)
    cache (re)build   0.5 s + cache bytes / 20 GB/s
    perplexity        2 s set-up per loaded (variant, cache) + per window 2048 tokens / prompt tok/s (20 windows)
    speed test        fill / prompt tok/s + 128 / gen tok/s + 1 s warm-up
    failed load (OOM) the load time (the engine finds out at the end of loading)
    prompt tok/s      4e13 / weight bytes;   gen tok/s  1e12 / weight bytes x cache factor / (1 + fill/64Ki) / split

Perplexity is ``5 + 6 / bits^1.5`` plus a cache term, times a per-variant ``surprise`` (the "misleading" landscape
makes one variant 5 % worse than any smooth curve). Per-window log-perplexity adds a window difficulty shared by every
configuration (spread 0.15) and a tiny configuration-specific noise (0.002), so 20 windows average to the landscape.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optimizer.backends.base import DeviceMemory, EvalProtocol, LoadSpec, PrepareInfo, SpeedProtocol, SpeedResult
from optimizer.formats.exl2_synth import synthesize
from optimizer.safetensors_header import write_header_only
from optimizer.sources.local import discover_local
from optimizer.space import Budget
from optimizer.study import SearchSpec
from optimizer.units import parse_size
from optimizer.variant import Variant
from optimizer.vram import Split

ROOT = Path(__file__).resolve().parents[1]
CACHE_PPL = {"fp16": 0.0, "fp8": 0.06, "q8": 0.004, "q6": 0.012, "q4": 0.05}
CACHE_GEN = {"fp16": 1.0, "fp8": 0.97, "q8": 0.92, "q6": 0.94, "q4": 0.96}
SPEED = SpeedProtocol(context_fill=2048, gen_tokens=128)
EVAL = EvalProtocol()
_rng = random.Random(7)
_half = [_rng.gauss(0, 0.15) for _ in range(EVAL.n_windows // 2)]
WINDOW_DIFFICULTY = [*_half, *(-x for x in _half)]  # mean exactly 0: 20 windows average to the landscape


@dataclass(frozen=True)
class Landscape:
    name: str
    config: dict[str, Any]
    bits: tuple[float, ...]
    vram: str
    split: Split
    contexts: tuple[int, ...]
    caches: tuple[str, ...] | None = None
    surprise: tuple[tuple[float, float], ...] = ()  #: (bits, factor on perplexity) the curve cannot know

    def factor(self, v: Variant) -> float:
        return dict(self.surprise).get(v.bits or 0.0, 1.0)


def load_s(v: Variant) -> float:
    return 4.0 + v.total_bytes / 1.5e9


def prompt_tps(v: Variant) -> float:
    return 4e13 / v.total_bytes


def ppl_of(ls: Landscape, v: Variant, cache: str) -> float:
    return (5.0 + 6.0 / (v.bits or 4.0) ** 1.5 + CACHE_PPL[cache]) * ls.factor(v)


def gen_of(v: Variant, cache: str, fill: int, split: Split) -> float:
    return 1e12 / v.total_bytes * CACHE_GEN[cache] / (1 + fill / 65536) / (1.0 + 0.08 * (split.n_devices - 1))


def ppl_cost(v: Variant, windows: int = EVAL.n_windows) -> float:
    return windows * EVAL.window / prompt_tps(v) + 2.0


def speed_cost(v: Variant, cache: str, fill: int, split: Split) -> float:
    return fill / prompt_tps(v) + SPEED.gen_tokens / gen_of(v, cache, fill, split) + 1.0


def cache_cost(cache_bytes: int) -> float:
    return 0.5 + cache_bytes / 20e9


def fill_of(ctx: int) -> int:
    return max(min(SPEED.context_fill, ctx - SPEED.gen_tokens), 1)


@dataclass
class CostEngine:
    """Engine that only advances a simulated clock (a test double of a GPU engine)."""

    ls: Landscape
    cache_bytes: dict[str, int]
    clock: float = 0.0
    spec: LoadSpec | None = None
    model_key: tuple[str, str] | None = None
    placed: tuple[int, str] | None = None  #: autosplit: (tokens, cache) the loaded layers were placed around
    ppl_started: bool = False
    done: list[tuple[float, str]] = field(default_factory=list)
    loads: int = 0

    def prepare(self, spec: LoadSpec) -> PrepareInfo:
        """Reloads as the exllamav2 backend does: on a new variant or split, and under autosplit unless the spec
        shares the loaded placement (``place_around``) with a context no longer than the one placed around."""
        auto = spec.split.mode == "auto"
        keep = spec.model_key == self.model_key and (not auto or (
            spec.place_around is not None and spec.placement == self.placed and spec.max_seq_len <= spec.placement[0]))
        if not keep:
            self.clock += load_s(spec.variant)
            self.loads += 1
            self.placed = spec.placement if auto else None
            if auto and spec.placement != (spec.max_seq_len, spec.cache):  # the placed-around cache, then replaced
                ctx, cache = spec.placement
                self.clock += cache_cost(self.cache_bytes.get(key_of(replace(spec, max_seq_len=ctx, cache=cache)), 0))
        self.clock += cache_cost(self.cache_bytes.get(key_of(spec), 0))
        self.model_key, self.spec, self.ppl_started = spec.model_key, spec, False
        own = not auto or (not keep and spec.placement == (spec.max_seq_len, spec.cache))
        return PrepareInfo(model_loaded=not keep, placed_around=None if own else self.placed)

    def tokenize(self, text: str) -> list[int]:
        return list(range(EVAL.n_windows * EVAL.window))  # token value / window = window index

    def perplexity(self, *, tokens: Any, protocol: EvalProtocol) -> float:
        s = self.spec
        assert s is not None
        n = min(protocol.n_windows, len(tokens) // protocol.window)
        self.clock += ppl_cost(s.variant, n) - (0.0 if not self.ppl_started else 2.0)
        self.ppl_started = True
        first = tokens[0] // protocol.window
        base = math.log(ppl_of(self.ls, s.variant, s.cache))
        logs = []
        for w in range(first, first + n):
            noise = random.Random(f"{s.variant.bits}|{s.cache}|{s.split.label}|{w}").gauss(0, 0.002)
            logs.append(base + WINDOW_DIFFICULTY[w % len(WINDOW_DIFFICULTY)] + noise)
        return math.exp(sum(logs) / len(logs))

    def speed(self, *, protocol: SpeedProtocol) -> SpeedResult:
        s = self.spec
        assert s is not None
        self.clock += speed_cost(s.variant, s.cache, protocol.context_fill, s.split)
        g = gen_of(s.variant, s.cache, protocol.context_fill, s.split)
        return SpeedResult(prompt_tok_s=prompt_tps(s.variant), gen_tok_s=g, context_fill=protocol.context_fill)

    def memory(self) -> tuple[DeviceMemory, ...]:
        assert self.spec
        self.done.append((self.clock, key_of(self.spec)))
        return ()

    def unload(self) -> None:
        self.model_key = self.placed = None

    def close(self) -> None:
        pass


def key_of(s: LoadSpec) -> str:
    return f"{s.variant.key}|ctx={s.max_seq_len}|cache={s.cache}|split={s.split.label}"


@dataclass
class CostBackend:
    engine: CostEngine
    name: str = "cost"
    formats: tuple[str, ...] = ("exl2",)

    def check_available(self) -> None:
        return None

    def open(self) -> CostEngine:
        return self.engine


def landscapes() -> list[Landscape]:
    smaug = json.loads((ROOT / "studies/examples/Smaug-34B-v0.1-3.0bpw-h6-exl2/config.json").read_text())
    smaug.pop("quantization_config", None)
    llama8 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
              "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}
    ctx = (4096, 8192, 16384, 32768, 65536)
    eight = (2.5, 3.0, 3.5, 4.0, 4.65, 5.0, 6.0, 8.0)
    return [
        Landscape("Smaug-34B, 24GB, 1 GPU", smaug, (2.5, 3.0, 3.5, 4.0, 4.65, 5.0, 6.0), "24GB", Split(), ctx),
        Landscape("Llama-3-8B shape, 10GB, 1 GPU", llama8, (3.0, 4.0, 5.0, 6.0, 8.0), "10GB", Split(), ctx),
        Landscape("Smaug-34B, 2x16GB autosplit", smaug, (3.0, 4.0, 5.0, 6.0), "16GB", Split(mode="auto", n_devices=2), ctx),
        Landscape("Smaug-34B, 8x5 on 2x24GB manual", smaug, eight, "24GB",
                  Split(mode="manual", n_devices=2, gpu_split=(20.0, 22.0)), ctx),
        Landscape("Llama-3-8B, 4.0bpw 5% worse", llama8, (3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 8.0), "10GB", Split(), ctx,
                  surprise=((4.0, 1.05),)),
    ]


def build(ls: Landscape, tmp: Path) -> SearchSpec:
    base = tmp / ls.name.replace(" ", "_").replace(",", "").replace("%", "pct")
    for b in ls.bits:
        d = base / f"{b}bpw"
        d.mkdir(parents=True, exist_ok=True)
        cfg = dict(ls.config, quantization_config={"quant_method": "exl2", "bits": b, "head_bits": 6})
        (d / "config.json").write_text(json.dumps(cfg))
        write_header_only(d / "output.safetensors", synthesize(cfg, bits=b, head_bits=6))
    variants = discover_local(base)
    return SearchSpec(variants=tuple(variants), budget=Budget(per_device=(parse_size(ls.vram),)), split=ls.split,
                      contexts=ls.contexts, caches=ls.caches, eval_protocol=EVAL, speed_protocol=SPEED)
