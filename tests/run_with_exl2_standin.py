"""TEST HOOK: run exl2opt with the CPU stand-in for ``exllamav2_ext`` installed (see exl2_ext_standin).

Meant to be started as a subprocess by tests (the stand-in patches ``torch.cuda`` process-wide):

    python tests/run_with_exl2_standin.py cli search --model DIR ...   # the exl2opt CLI
    python tests/run_with_exl2_standin.py causality DIR                # JSON: check with ours / the default config
    python tests/run_with_exl2_standin.py placement DIR TEXT           # JSON: caches in a shared autosplit placement
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import exl2_ext_standin  # noqa: E402

exl2_ext_standin.install()


def causality(model_dir: str, ctx: int = 256) -> dict[str, object]:
    """The causality check on ``model_dir`` loaded by ExLlamaV2Engine, then with the library's default
    ``no_sdpa`` (False), as a dict of both results."""
    from optimizer.backends.base import LoadSpec
    from optimizer.backends.exllamav2 import ExLlamaV2Engine
    from optimizer.sources.local import variant_from_dir
    from optimizer.vram import Split

    eng = ExLlamaV2Engine()
    eng.prepare(LoadSpec(variant=variant_from_dir(Path(model_dir)), split=Split(), max_seq_len=ctx, cache="fp16"))
    ours = eng.check_causality()
    no_sdpa = bool(eng.model.config.no_sdpa)
    eng.model.config.no_sdpa = False  # what ExLlamaV2Config() sets without EXLLAMA_NO_SDPA
    default = eng.check_causality()
    eng.close()
    return {"ours": {"no_sdpa": no_sdpa, "passed": ours.passed, "before": ours.max_change_before,
                     "at": ours.change_at, "line": ours.line()},
            "default": {"no_sdpa": False, "passed": default.passed, "before": default.max_change_before,
                        "at": default.change_at, "line": default.line()},
            "ext_calls": dict(exl2_ext_standin.CALLS)}


def placement(model_dir: str, text_path: str) -> dict[str, object]:
    """Perplexity of a Q4 cache built in an autosplit placement made around an FP16 cache of twice the
    length (LoadSpec.place_around), then of a Q8 cache in the same placement, then of the Q4 cache after a fresh
    autosplit load of its own; with what prepare() reported and where the Q4 cache's tensors live."""
    from optimizer.backends.base import EvalProtocol, LoadSpec
    from optimizer.backends.exllamav2 import ExLlamaV2Engine
    from optimizer.sources.local import variant_from_dir
    from optimizer.vram import Split

    v = variant_from_dir(Path(model_dir))
    auto = Split(mode="auto", n_devices=2)
    proto = EvalProtocol(dataset="t", window=128, n_windows=4, prefill=64, score_chunk=32)
    eng = ExLlamaV2Engine()
    text = Path(text_path).read_text()
    out: dict[str, object] = {}
    for name, spec in (("shared_q4", LoadSpec(variant=v, split=auto, max_seq_len=128, cache="q4", place_around=(256, "fp16"))),
                       ("shared_q8", LoadSpec(variant=v, split=auto, max_seq_len=256, cache="q8", place_around=(256, "fp16"))),
                       ("fresh_q4", LoadSpec(variant=v, split=auto, max_seq_len=128, cache="q4"))):
        info = eng.prepare(spec)
        toks = eng.tokenize(text)
        out[name] = {"ppl": eng.perplexity(tokens=toks, protocol=proto), "loaded": info.model_loaded,
                     "placed_around": list(info.placed_around) if info.placed_around else None,
                     "rope_len": int(eng.model.config.max_seq_len), "cache_map": sorted(set(map(str, eng.model.cache_map.values()))),
                     "key_devices": sorted({str(t.device) for t in eng.cache.key_states}),
                     "staging": sorted(map(str, getattr(eng.cache, "temp_tensors", {})))}
    eng.close()
    return out


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "cli":
        from optimizer.cli import main

        main(args)
    elif what == "causality":
        print(json.dumps(causality(args[0])))
    elif what == "placement":
        print(json.dumps(placement(args[0], args[1])))
    else:
        sys.exit(f"unknown mode {what!r}")
