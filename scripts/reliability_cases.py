"""Run the issue-9 red-team examples through the real CLI and print what happened, as Markdown rows.

Each case runs ``python -m optimizer ...`` in a fresh subprocess (under ``/usr/bin/time`` for the
peak RSS when it exists) and reports the exit code, the first stderr line (cut to 150 characters),
the wall time and the peak RSS. Hub cases use the loopback fake Hub of ``tests/fakehub.py`` with
hostile answers; nothing leaves the machine. Storage cases that need a read-only or full file
system mount one (tmpfs / read-only bind) when run as root, and say "skipped" otherwise.
docs/reliability.md quotes this output.

Run: ``PYTHONPATH=.:tests python scripts/reliability_cases.py``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from exl2_fixtures import TINY_LLAMA, make_exl2_dir  # noqa: E402
from fakehub import FakeFile, FakeHub, FakeRepo, exl2_files  # noqa: E402
from gguf_raw import ARR, BOOL, F64, I32, RAW_ARR, STR, U32, U64, gguf_bytes, nested_array, tiny_llama_kv, tiny_llama_tensors  # noqa: E402
from oracle_util import tiny_gemma3_config, write_model_dir  # noqa: E402

from optimizer.safetensors_header import write_header_only  # noqa: E402

EXAMPLE = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
BIG = "1" + "0" * 400
_TMP_RE = re.compile(r"/tmp/exl2opt-cases-[^/]+/\d+")
TIME = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)


def run(args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[int, str, float, str]:
    """(exit code, first stderr line, seconds, peak RSS) of ``python -m optimizer <args>``."""
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "COLUMNS": "200", **(env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        cmd = [sys.executable, "-m", "optimizer", *args]
        if TIME:
            cmd = [TIME, "-f", "%M", "-o", rss.name, *cmd]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=cwd, timeout=600)
        wall = time.perf_counter() - t0
        kb = rss.read().strip().splitlines()[-1:] if TIME else []
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "━" not in ln]
    first = lines[0] if lines else "(no stderr)"
    peak = f"{int(kb[0]) // 1024} MB" if kb and kb[0].isdigit() else "—"
    return r.returncode, first, wall, peak


def row(case: str, result: tuple[int, str, float, str], note: str = "") -> None:
    code, line, wall, peak = result
    line = _TMP_RE.sub("…", line).replace("|", "\\|")
    line = line if len(line) <= 150 else line[:147] + "..."
    extra = f"; {_TMP_RE.sub('…', note)}" if note else ""
    print(f"| {case} | `{line}`{extra} | {code} | {wall:.1f} s | {peak} |")


def hub_cases(tmp: Path) -> None:
    print("\n### 1-2. Names from a hostile Hub (fake Hub on 127.0.0.1)\n")
    print("| Case | stderr (first line) | Exit | Time | Peak RSS |\n|---|---|---|---|---|")
    cache = tmp / "cache"
    env = {"EXL2OPT_CACHE": str(cache), "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1"}
    row("`plan -m 'org/x@../../../../tmp/f'`", run(["plan", "-m", "org/x@../../../../tmp/f", "--vram", "8GB"], env=env))
    files, _ = exl2_files(4.0, 6)
    full = {k: FakeFile(v.data) for k, v in files.items()}
    target = tmp / "target"
    inject = f"4.0bpw;touch${{IFS}}{tmp / 'pwned'};#"
    with FakeHub() as hub:
        hub.add(FakeRepo("org/evil", {"4.0bpw": full, f"{'../' * 12}{target}": full, inject: full}))
        hub.listed_commits["4.0bpw"] = f"{'../' * 12}{target}-commit"
        hub.resolve_headers.update({"ETag": f'"{"../" * 12}{target}-etag"', "X-Repo-Commit": f"{'../' * 12}{target}-xrc"})
        env = {"EXL2OPT_CACHE": str(cache), "HF_HOME": str(tmp / "hf"), "HF_ENDPOINT": hub.endpoint}
        res = run(["fit", "-m", "org/evil", "--vram", "24GB", "--json"], env=env, cwd=tmp)
        stray = sorted(str(p) for p in tmp.glob("target*"))
        row("branch `../…/target`, ETag and X-Repo-Commit `../…/target-*`, listed commit `../…`", res,
            f"files outside the cache: {stray or 'none'}")
        from optimizer.sources import HubOptions, RepoSpec
        from optimizer.sources.download import local_path
        from optimizer.sources.hub import discover_hub

        os.environ.update(env)
        (v,) = [v for v in discover_hub(spec=RepoSpec("org/evil"), options=HubOptions(endpoint=hub.endpoint,
                                                                                      cache_dir=str(cache)))
                if v.location.revision == inject]
        cmd = v.location.download_command()
        subprocess.run(["bash", "-c", cmd.replace("hf download", "true", 1)], check=True)
        shown = _TMP_RE.sub("…", cmd.replace(str(tmp), "…")).replace("_tmp_exl2opt-cases-", "…")
        print(f"| branch `{inject.replace(str(tmp), '…')}`: download command | `{shown}`; pasted into bash, "
              f"`pwned` created: {(tmp / 'pwned').exists()} | — | — | — |")
        path = local_path(v)
        inside = Path(path).resolve().is_relative_to(cache.resolve())
        print(f"| the same branch: measurement-time download with the hostile ETag | written under the exl2opt cache: "
              f"{inside}; files outside the cache: {sorted(str(p) for p in tmp.glob('target*')) or 'none'} | — | — | — |")


def gguf_cases(tmp: Path) -> None:
    print("\n### 3. Hostile GGUF metadata (`plan -m evil.gguf --vram 24GB --ctx 4096`)\n")
    print("| Case | stderr (first line) | Exit | Time | Peak RSS |\n|---|---|---|---|---|")
    kv0 = tiny_llama_kv()
    cases = {
        "1 kB file, `block_count = 10^8`": tiny_llama_kv(block_count=(U64, 10**8)),
        "arrays nested 5,000 deep": kv0 + [("evil", RAW_ARR, nested_array(5000))],
        "`block_count = 0`": tiny_llama_kv(block_count=(U32, 0)),
        "`block_count = -5`": tiny_llama_kv(block_count=(I32, -5)),
        "`block_count = \"two\"`": tiny_llama_kv(block_count=(STR, "two")),
        "`block_count = true`": tiny_llama_kv(block_count=(BOOL, True)),
        "`context_length = inf`": tiny_llama_kv(context_length=(F64, float("inf"))),
        "`general.alignment = \"x\"`": [kv0[0], ("general.alignment", STR, "x"), *kv0[2:]],
        "`head_count_kv` array shorter than the layers": tiny_llama_kv(attention__head_count_kv=(ARR, (U32, [2]))),
        "`embedding_length = -256`": tiny_llama_kv(embedding_length=(I32, -256)),
    }
    for label, kv in cases.items():
        p = tmp / "evil.gguf"
        p.write_bytes(gguf_bytes(kv, tiny_llama_tensors()))
        row(label, run(["plan", "-m", str(p), "--vram", "24GB", "--ctx", "4096"]))
    p.write_bytes(gguf_bytes(kv0, [("blk.0.attn_q.weight", (2**64 - 1,) * 4, 0, 0), *tiny_llama_tensors()]))
    row("a tensor of (2^64−1)^4 elements", run(["plan", "-m", str(p), "--vram", "24GB", "--ctx", "4096"]))
    with FakeHub() as hub:
        hub.add(FakeRepo("org/evil-GGUF", {"main": {"M-Q4_0.gguf": FakeFile(
            gguf_bytes(tiny_llama_kv(block_count=(U64, 10**8)), tiny_llama_tensors()))}}))
        row("the same `block_count = 10^8` file served by a Hub repo",
            run(["plan", "-m", "org/evil-GGUF", "--vram", "24GB", "--ctx", "4096"],
                env={"HF_ENDPOINT": hub.endpoint, "EXL2OPT_CACHE": str(tmp / "c2")}))


def weights_cases(tmp: Path) -> None:
    print("\n### 4. Tensors the rules do not account for (`plan -m <dir> --vram 24GB --ctx 4096`)\n")
    print("| Case | stderr (first line) | Exit | Time | Peak RSS |\n|---|---|---|---|---|")
    d = tmp / "decoy"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, "num_hidden_layers": 1}))
    write_header_only(d / "output.safetensors", {"model.layers.0.x": ("F16", (8,)),
                                                 "transformer.layers.0.weight": ("F16", (200_000, 250_000))})
    row("decoy `model.layers.0.x` + 100 GB `transformer.layers.0.weight`", run(["plan", "-m", str(d), "--vram", "24GB",
                                                                                "--ctx", "4096"]))
    g = tmp / "gemma-over-llama"
    make_exl2_dir(tmp, "llama", {**TINY_LLAMA, "num_hidden_layers": 2}, bits=4.0)
    g.mkdir()
    shutil.copy(tmp / "llama" / "output.safetensors", g / "output.safetensors")
    write_model_dir(tmp / "gemma-tmp", tiny_gemma3_config())
    shutil.copy(tmp / "gemma-tmp" / "config.json", g / "config.json")
    row("Gemma 3 config over Llama-named tensors", run(["plan", "-m", str(g), "--vram", "24GB", "--ctx", "4096"]))


def header_cases(tmp: Path) -> None:
    print("\n### 5. Header resource caps (`plan -m <dir>`, `output.safetensors` replaced)\n")
    print("| Case | stderr (first line) | Exit | Time | Peak RSS |\n|---|---|---|---|---|")

    def with_header(name: str, raw: bytes) -> Path:
        d = tmp / name
        d.mkdir()
        shutil.copy(EXAMPLE / "config.json", d / "config.json")
        raw += b" " * (-len(raw) % 8)
        (d / "output.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
        return d

    lists = with_header("lists", b'{"__metadata__":{"a":' + b"[]," * 8_299_999 + b"[]}}")
    row("24.9 MB header: 8.3 million empty lists in `__metadata__`", run(["plan", "-m", str(lists), "--vram", "24GB"]))
    esc = with_header("esc", b"{" + b",".join(b'"model.layers.0.\\u0074%x":{"dtype":"U8","shape":[],"data_\\u006fffsets":[%d,%d]}'
                                              % (i, i, i + 1) for i in range(250_001)) + b"}")
    row("250,001 tensors, keys and `data_\\u006fffsets` escaped", run(["plan", "-m", str(esc), "--vram", "24GB"]))


def storage_cases(tmp: Path) -> None:
    print("\n### 6. Study storage (`search` with the fake engine, 2 variants x 2 caches)\n")
    print("| Case | stderr (first line) | Exit | Time | Peak RSS |\n|---|---|---|---|---|")
    models = tmp / "models"
    for b in (3.0, 4.0):
        make_exl2_dir(models, f"{b}bpw", TINY_LLAMA, bits=b)
    ev = tmp / "eval.txt"
    ev.write_text("the quick brown fox jumps over the lazy dog. " * 40)

    def search(root: Path, *extra: str) -> tuple[int, str, float, str]:
        return run(["search", "-m", str(models), "--vram", "8GB", "--ctx", "2048", "--cache", "fp16,q4", "--study", "s",
                    "--studies-dir", str(root), "--eval-data", str(ev), "--backend-factory",
                    "fake_engine:fake_backend_factory", "--no-report", *extra], env={"FAKE_ENGINE_DELAY": "0"})

    st = tmp / "st"
    search(st, "--n-trials", "2")
    j = st / "s" / "journal.log"
    with open(j, "r+b") as f:
        f.truncate(j.stat().st_size - 40)
    row("`journal.log` cut 40 bytes into its last record, then `search` again", search(st))
    row("... and once more (the resumed journal reads back)", search(st))
    if os.geteuid() != 0 or not shutil.which("mount"):
        print("| read-only study folder / full disk | skipped (needs root to mount) | — | — | — |")
        return
    ro = tmp / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(st), str(ro)]).returncode == 0:
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
            row("study folder on a read-only mount: `search`", search(ro))
            row("the same: `report s --studies-dir <ro>`", run(["report", "s", "--studies-dir", str(ro)]))
        finally:
            subprocess.run(["umount", str(ro)])
    full = tmp / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)]).returncode == 0:
        try:
            row("study on a 64 kB tmpfs (disk full mid-study)", search(full))
            subprocess.run(["mount", "-o", "remount,size=10m", str(full)], check=True)
            row("space freed, `search` again", search(full))
        finally:
            subprocess.run(["umount", str(full)])


def terminal_cases(tmp: Path) -> None:
    print("\n### 7. Secrets and the terminal\n")
    print("| Case | stderr (first line) | Exit | Time | Peak RSS |\n|---|---|---|---|---|")
    row("`report s --storage 'postgresql+psycopg://u@127.0.0.1:1/db?password=s3cret'`",
        run(["report", "s", "--storage", "postgresql+psycopg://u@127.0.0.1:1/db?password=s3cret"]))
    for name in ("q[/b]", "x\x1b]52;c;cHduZWQ=\x07y"):
        d = tmp / "m" / name
        shutil.copytree(EXAMPLE, d)
        e = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
        r = subprocess.run([sys.executable, "-m", "optimizer", "fit", "-m", str(d), "--vram", "24GB"], capture_output=True,
                           text=True, env=e, timeout=300)
        shown = next((ln for ln in r.stdout.splitlines() if "52;c" in ln or "q[" in ln), "")
        print(f"| folder `{name.encode('unicode_escape').decode()}`: `fit` | stdout line: "
              f"`{shown.replace(str(tmp), '…')[:120]}`; raw ESC on stdout: {chr(27) in r.stdout} | {r.returncode} | — | — |")


def option_cases() -> None:
    print("\n### 8. Options (`plan -m <Smaug example> ...`)\n")
    print("| Case | stderr (first line) | Exit | Time | Peak RSS |\n|---|---|---|---|---|")
    m = ["plan", "-m", str(EXAMPLE)]
    for label, args in {
        "`--vram 1<400 zeros>GB`": ["--vram", BIG + "GB"],
        "`--batch 1<400 zeros>`": ["--vram", "8GB", "--batch", BIG],
        "`--gpu-split` with 30,000 entries": ["--vram", "8GB", "--gpu-split", ",".join(["1"] * 30000)],
        "`--csv /tmp` (a directory)": ["--vram", "8GB", "--csv", "/tmp"],
        "`--n-gpu-layers 1000000`": ["--vram", "8GB", "--n-gpu-layers", "1000000"],
    }.items():
        row(label, run(m + args))
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "optimizer", *m, "--vram", "24GB", "--ctx", "4096", "--cache",
                        "fp16,fp16,FP16", "--json"], capture_output=True, text=True, env=e, timeout=120)
    print(f"| `--cache fp16,fp16,FP16` | rows printed: {len(json.loads(r.stdout))} (one per cache mode) | {r.returncode} | — | — |")
    row("`report` with a 130-character non-ASCII study name", run(["report", "é" * 130]))


def main() -> None:
    print(f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}: `{shlex.join(['python', 'scripts/reliability_cases.py'])}`")
    with tempfile.TemporaryDirectory(prefix="exl2opt-cases-") as d:
        tmp = Path(d)
        for i, fn in enumerate((hub_cases, gguf_cases, weights_cases, header_cases, storage_cases, terminal_cases)):
            sub = tmp / str(i)
            sub.mkdir()
            fn(sub)
        option_cases()


if __name__ == "__main__":
    main()
