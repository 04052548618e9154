"""TEST HOOK: run exl2opt with the CPU stand-in for ``exllamav2_ext`` installed (see exl2_ext_standin).

Meant to be started as a subprocess by tests (the stand-in patches ``torch.cuda`` process-wide):

    python tests/run_with_exl2_standin.py cli search --model DIR ...   # the exl2opt CLI
    python tests/run_with_exl2_standin.py causality DIR                # JSON: check with ours / the default config
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


if __name__ == "__main__":
    what, args = sys.argv[1], sys.argv[2:]
    if what == "cli":
        from optimizer.cli import main

        main(args)
    elif what == "causality":
        print(json.dumps(causality(args[0])))
    else:
        sys.exit(f"unknown mode {what!r}")
