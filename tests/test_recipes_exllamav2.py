"""The exl2 recipes run against the real exllamav2 0.3.2 on the CPU.

The compiled extension is replaced by the plain-torch TEST DOUBLE ``exl2_ext_standin`` (in a
subprocess, with two stand-in GPUs); the library is the real one. Every Python recipe (each cache
mode, one GPU, a manual split, autosplit) is executed as printed against a tiny FP16 Llama: it must
build the cache class and length it names and leave the model loaded. The example-script line is
parsed by the library's own ``model_init.add_args`` plus the five flags ``examples/chat.py`` v0.3.2
declares itself (``-mode``, ``-c8``, ``-cq4``, ``-cq6``, ``-cq8``; the script is not in the wheel, so
those five are re-declared here from its source, as a stand-in for the rest of its parser).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("tokenizers")
if importlib.util.find_spec("exllamav2") is None:  # never imported here: it would JIT-build its extension
    pytest.skip("exllamav2 is not installed", allow_module_level=True)

from tiny_llama import write_tiny_llama  # noqa: E402

from optimizer.recipes import RunSpec, recipe  # noqa: E402
from optimizer.recipes.exl2 import CACHE_CLASS  # noqa: E402
from optimizer.vram import Split  # noqa: E402

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
SPLITS = {"1gpu": Split(), "manual": Split(mode="manual", gpu_split=(1.0, 1.0)), "auto": Split(mode="auto", n_devices=2)}
CHAT_CACHE = {"fp16": [], "fp8": ["cache_8bit"], "q8": ["cache_q8"], "q6": ["cache_q6"], "q4": ["cache_q4"]}

RUNNER = r"""
import json, sys
import exl2_ext_standin
exl2_ext_standin.install()
import argparse
from exllamav2 import model_init
jobs = json.loads(sys.stdin.read())
out = []
for job in jobs:
    ns = {}
    exec(job["python"], ns)
    out.append({"cache": type(ns["cache"]).__name__, "len": ns["cache"].max_seq_len,
                "loaded": bool(ns["model"].loaded), "config_len": ns["config"].max_seq_len})
    ns["model"].unload()
    p = argparse.ArgumentParser()
    p.add_argument("-mode", "--mode")  # examples/chat.py's own flags (stand-in, see the module docstring)
    for f, name in (("-c8", "cache_8bit"), ("-cq4", "cache_q4"), ("-cq6", "cache_q6"), ("-cq8", "cache_q8")):
        p.add_argument(f, "--" + name, action="store_true")
    model_init.add_args(p)
    a = p.parse_args(job["argv"])
    caches = [n for n in ("cache_8bit", "cache_q4", "cache_q6", "cache_q8") if getattr(a, n)]
    out[-1].update({"model_dir": a.model_dir, "length": a.length, "gpu_split": a.gpu_split, "mode": a.mode, "caches": caches})
print(json.dumps(out))
"""


def test_python_and_script_recipes_against_the_real_library(tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "tiny model", seed=0)
    jobs, want = [], []
    for cache in CACHE_CLASS:
        for name, split in SPLITS.items():
            spec = RunSpec(fmt="exl2", label="tiny", model_path=str(model), max_seq_len=512, cache=cache, split=split)
            words = shlex.split(recipe(spec, tool="script").text)
            jobs.append({"python": recipe(spec, tool="python").text, "argv": words[words.index("examples/chat.py") + 1:]})
            want.append((cache, name))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), EXL2OPT_STANDIN_DEVICES="2")
    res = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(jobs), capture_output=True, text=True,
                         env=env, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for (cache, name), r in zip(want, got, strict=True):
        assert r["cache"] == CACHE_CLASS[cache] and r["len"] >= 512 and r["config_len"] == 512 and r["loaded"], (cache, name, r)
        assert r["model_dir"] == str(model) and r["length"] == 512
        assert r["gpu_split"] == {"1gpu": None, "manual": "1,1", "auto": "auto"}[name]
        assert r["mode"] == "raw" and r["caches"] == CHAT_CACHE[cache]
