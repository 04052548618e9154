"""The GPU part of scripts/gpu-check.sh: real exl2 models, a real search, the causality check, Q-cache bytes.

Run by gpu-check.sh (which builds the extension first) on a machine with one NVIDIA GPU and no
network. Steps, each printed with its figures:
    1. a small FP16 Llama (tests/tiny_llama.py: random weights, a trained byte-level BPE tokenizer);
    2. two exl2 variants of it made by exllamav2's own converter (``convert_exl2``, built-in
       calibration text);
    3. ``exl2opt search`` on 2 variants x 3 cache modes, then per trial the predicted VRAM beside
       the measured ``max_memory_allocated`` and ``mem_get_info`` (used) and the overhead seen;
    4. the causality check through ExLlamaV2Engine, with our config and with the library default;
    5. the Q4/Q6/Q8 and FP8 cache bytes of the real extension beside the CPU stand-in's
       (tests/exl2_ext_standin.py), on the same K/V.
``--dry-run`` checks the script itself on the CPU (no CUDA): step 1 with the small test shape, step 3
on the FP16 model as the only variant and step 4, both through the CPU stand-in of the extension
(tests/exl2_ext_standin.py), and step 5's stand-in half.
A JSON summary goes to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

GIB = 2**30
#: the model the check converts: big enough that weights and cache dominate fixed costs (~0.3 GB FP16)
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
         "num_hidden_layers": 8, "vocab_size": 32000}
VARIANTS = (3.0, 5.0)
CACHES = "fp16,q8,q4"
#: search settings: context, eval window, speed fill (tokens); the dry run uses small ones on the CPU
FULL = {"ctx": 4096, "window": 512, "fill": 2048}
DRY = {"ctx": 256, "window": 128, "fill": 64}


def step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.monotonic()


def sh(cmd: list[str], *, timeout: float) -> str:
    print("$ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                                        os.environ.get("PYTHONPATH", "")])))
    if r.returncode != 0:
        sys.exit(f"gpu-check: command failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def make_models(work: Path, *, dry: bool) -> tuple[Path, Path]:
    from tiny_llama import corpus, write_tiny_llama

    fp16 = write_tiny_llama(work / "fp16", seed=0, qk_std=0.2, vo_std=0.2, **({} if dry else SHAPE))
    text = work / "eval.txt"
    text.write_text(corpus(n_words=6000, seed=42))
    return fp16, text


def convert(fp16: Path, work: Path) -> Path:
    variants = work / "variants"
    for bits in VARIANTS:
        out = variants / f"tiny-{bits:.1f}bpw"
        if (out / "config.json").exists():
            continue
        sh([sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(fp16), "-o", str(work / f"job-{bits}"),
            "-cf", str(out), "-b", str(bits), "-hb", "6", "-r", "16", "-mr", "8", "-l", "512", "-ml", "512", "-nr"],
           timeout=600)
    return variants


def search(variants: Path, text: Path, work: Path, *, dry: bool) -> list[dict[str, Any]]:
    studies = work / "studies"
    st = DRY if dry else FULL
    cli = [sys.executable, str(ROOT / "tests" / "run_with_exl2_standin.py"), "cli"] if dry else [sys.executable, "-m", "optimizer"]
    sh([*cli, "search", "--model", str(variants), "--vram", "20GiB", "--ctx", str(st["ctx"]),
        "--min-ctx", str(st["ctx"]), "--cache", CACHES, "--eval-data", str(text), "--eval-window", str(st["window"]),
        "--eval-windows", "4", "--speed-fill", str(st["fill"]), "--studies-dir", str(studies), "--study", "gpucheck",
        "--no-report", "--exhaustive"], timeout=600)
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(studies / "gpucheck" / "journal.log")))
    rows = []
    for t in optuna.load_study(study_name="gpucheck", storage=storage).trials:
        a = t.user_attrs
        pred = (a.get("predicted") or [{}])[0]
        meas = (a.get("measured") or [{}])[0]
        rows.append({"variant": Path(str(t.params.get("variant"))).name, "cache": t.params.get("cache"),
                     "status": a.get("status"), "reason": a.get("reason", ""),
                     "predicted_gib": pred.get("total", 0) / GIB,
                     "predicted_overhead_gib": pred.get("overhead", 0) / GIB,
                     "peak_allocated_gib": meas.get("peak_allocated", 0) / GIB, "used_gib": meas.get("used", 0) / GIB,
                     "reserved_gib": (meas.get("reserved") or 0) / GIB, "overhead_seen_gib": (meas.get("overhead") or 0) / GIB,
                     "perplexity": a.get("perplexity"), "gen_tok_s": a.get("gen_tok_s")})
    print(f"{'variant':<14} {'cache':<5} {'status':<9} {'pred GiB':>8} {'(ovh)':>6} {'peak alloc':>10} {'used':>7} "
          f"{'reserved':>8} {'ovh seen':>8} {'ppl':>10} {'tok/s':>8}")
    for r in rows:
        print(f"{r['variant']:<14} {r['cache']:<5} {r['status']:<9} {r['predicted_gib']:8.3f} {r['predicted_overhead_gib']:6.2f} "
              f"{r['peak_allocated_gib']:10.3f} {r['used_gib']:7.3f} {r['reserved_gib']:8.3f} {r['overhead_seen_gib']:8.3f} "
              f"{r['perplexity'] or float('nan'):10.3f} {r['gen_tok_s'] or float('nan'):8.1f} {r['reason']}")
    return rows


def causality(variant_dir: Path, *, dry: bool) -> dict[str, Any]:
    from optimizer.backends.base import LoadSpec
    from optimizer.backends.exllamav2 import ExLlamaV2Engine
    from optimizer.sources.local import variant_from_dir
    from optimizer.vram import Split

    eng = ExLlamaV2Engine()
    eng.prepare(LoadSpec(variant=variant_from_dir(variant_dir), split=Split(), max_seq_len=DRY["ctx"] if dry else 1024,
                         cache="fp16"))
    ours = eng.check_causality()
    uses = {"no_sdpa": bool(eng.model.config.no_sdpa), "flash_attn": bool(eng.xl.attn.has_flash_attn),
            "xformers": bool(eng.xl.attn.has_xformers)}
    eng.model.config.no_sdpa = False
    default = eng.check_causality()
    eng.close()
    print("ours:   ", ours.line(), uses)
    print("default:", default.line(), "(config.no_sdpa = False)")
    return {"ours": vars(ours), "default": vars(default), "attention": uses}


def _kv(shape: tuple[int, ...], seed: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 2).half()


def qcache_bytes(*, device: str) -> dict[str, Any]:
    """Quantize the same K/V with the real extension (on ``device``) and the stand-in (CPU); compare."""
    import exl2_ext_standin as standin
    import torch

    real = None
    if device != "cpu":
        from exllamav2.ext import exllamav2_ext as real
    tokens, heads, dim = 64, 4, 128
    k, v = _kv((1, tokens, heads, dim), 1), _kv((1, tokens, heads, dim), 2)
    meta = torch.empty((1, 1), device="meta")
    out: dict[str, Any] = {}
    for wbits in (4, 6, 8):
        kb, vb = standin._bits(wbits)
        bufs = {}
        for name, fns in (("standin", standin), ("real", real)):
            if fns is None:
                continue
            dev = "cpu" if name == "standin" else device
            ko = torch.zeros(1, tokens, heads, dim * kb // 8, dtype=torch.uint8, device=dev)
            vo = torch.zeros(1, tokens, heads, dim * vb // 8, dtype=torch.uint8, device=dev)
            ks = torch.zeros(1, tokens, heads, dim // 32, dtype=torch.half, device=dev)
            vs = torch.zeros_like(ks)
            fns.fp16_to_q_kv(k.to(dev), ko, ks, v.to(dev), vo, vs, 1, 0, tokens, 0, meta, meta, wbits)
            k2, v2 = torch.zeros_like(k, device=dev), torch.zeros_like(v, device=dev)
            fns.q_to_fp16_kv(ko, k2, ks, vo, v2, vs, 1, 0, tokens, 0, meta, meta, wbits)
            bufs[name] = [x.cpu() for x in (ko, vo, ks, vs, k2, v2)]
        s = bufs["standin"]
        rel = float((s[4].float() - k.float()).norm() / k.float().norm())
        entry: dict[str, Any] = {"bytes": int(s[0].numel() + s[1].numel() + 2 * (s[2].numel() + s[3].numel())),
                                 "standin_rel_err_k": rel}
        if "real" in bufs:
            r = bufs["real"]
            entry.update(
                same_k_bytes=float((r[0] == s[0]).float().mean()), same_v_bytes=float((r[1] == s[1]).float().mean()),
                same_scales=float(((r[2] == s[2]).float().mean() + (r[3] == s[3]).float().mean()) / 2),
                max_dequant_diff=float(max((r[4].float() - s[4].float()).abs().max(), (r[5].float() - s[5].float()).abs().max())))
        out[f"q{wbits}"] = entry
        print(f"Q cache wbits={wbits}: " + ", ".join(f"{key} {val:.4g}" if isinstance(val, float) else f"{key} {val}"
                                                    for key, val in entry.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/exl2opt-gpu-check"))
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu-check.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU only: model files and the stand-in half")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    t = step("1. tiny FP16 Llama")
    fp16, text = make_models(args.work, dry=args.dry_run)
    print(f"{fp16} ({sum(f.stat().st_size for f in fp16.iterdir()) / 2**20:.0f} MiB) in {time.monotonic() - t:.1f} s")
    if args.dry_run:  # the FP16 model is the only variant, run by the CPU stand-in
        variants = args.work / "variants"
        variants.mkdir(exist_ok=True)
        if not (variants / "fp16").exists():
            (variants / "fp16").symlink_to(fp16, target_is_directory=True)
        import exl2_ext_standin

        exl2_ext_standin.install()
    else:
        t = step("2. exl2 variants by exllamav2's converter")
        variants = convert(fp16, args.work)
        print(f"{sorted(p.name for p in variants.iterdir())} in {time.monotonic() - t:.1f} s")
    st = DRY if args.dry_run else FULL
    t = step(f"3. exl2opt search: {sorted(p.name for p in variants.iterdir())} x {CACHES} at {st['ctx']} tokens")
    summary["trials"] = search(variants, text, args.work, dry=args.dry_run)
    print(f"search took {time.monotonic() - t:.1f} s")
    step("4. causality check (logits before a changed token must not move)")
    summary["causality"] = causality(sorted(variants.iterdir())[0], dry=args.dry_run)
    step("5. Q-cache bytes: real exllamav2_ext vs the CPU stand-in")
    summary["qcache"] = qcache_bytes(device="cpu" if args.dry_run else "cuda:0")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu-check.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
