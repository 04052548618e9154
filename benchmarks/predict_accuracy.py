"""How well ``optimizer.predict`` predicts published perplexity and decode speed (leave one model out).

Usage: ``.venv/bin/python benchmarks/predict_accuracy.py``

Data: ``optimizer/predict/data/published-ppl.csv`` (exllamav3 ``doc/exl3.md`` charts: 4 models x EXL2/EXL3/GGUF;
llama.cpp GGUF tables of Llama-3-8B, Llama-3-70B and Llama-2-70B with their FP16 perplexity) and
``published-speed.csv`` (exllamav2 README table, oobabooga's 13B runs, four issue threads;
llama.cpp runs from XiongjieDai/GPU-Benchmarks-on-LLM-Inference).

Perplexity: see ``benchmarks/ppl_lomo.py`` (leave one unit -- model x harness -- out; 0 anchors as a ratio to FP16,
2 anchors, the prior interval's coverage and the rank correlation, on the original 4 units and on all 7).

Decode speed: see ``benchmarks/speed_accuracy.py`` (median |error| per engine and GPU: shipped priors on all rows
and without the rows the source marks host-bound, priors refitted leave-one-model-out, per-GPU fit, naive roofline).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ppl_lomo import perplexity_report  # noqa: E402
from benchmarks.speed_accuracy import speed_report  # noqa: E402


def main() -> None:
    q = perplexity_report()
    s = speed_report()
    print(f"\nsummary: ppl_0_anchors={100 * q['ppl0']:.2f}% (b>=3: {100 * q['ppl0_3']:.2f}%, family out: "
          f"{100 * q['ppl0_family']:.2f}%) ppl_2_anchors={100 * q['ppl2']:.2f}% "
          f"(fitted slope {100 * q['ppl2_fitted']:.2f}%) ppl_0_coverage={100 * q['coverage']:.0f}% rank_rho={q['rho']:.3f}\n"
          f"         decode_speed_priors={100 * s['all']:.1f}% "
          f"(excl. host-bound {100 * s['excl_host_bound']:.1f}%, groups within 10%: {s['groups_within']:.0f}/{s['groups']:.0f})")


if __name__ == "__main__":
    main()
