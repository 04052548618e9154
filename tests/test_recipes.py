"""Run recipes (optimizer.recipes): every tool x cache mode x split, quoting of hostile names, fit output."""

from __future__ import annotations

import ast
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from optimizer.allocator import ENV, EXPANDABLE
from optimizer.errors import BadOptionError
from optimizer.recipes import (
    TOOLS,
    RunSpec,
    model_path,
    parse_recipe_option,
    recipe,
    sh_quote,
    split_from_label,
    yaml_str,
)
from optimizer.variant import Location
from optimizer.vram import MIB, Split

yaml = pytest.importorskip("yaml")  # PyYAML (an Optuna dependency) parses the TabbyAPI blocks

ENV_WORD = f"{ENV}={EXPANDABLE}"
SPLITS = {
    "single": Split(),
    "manual": Split(mode="manual", gpu_split=(10.0, 15.5)),
    "auto": Split(mode="auto", n_devices=2),
    "auto-reserve": Split(mode="auto", n_devices=2, reserve_bytes=(512 * MIB, 128 * MIB)),
}
EXL2_CACHES = ("fp16", "fp8", "q8", "q6", "q4")
#: ModelConfig fields of TabbyAPI's common/config_models.py (branch exl2-checkpoint, 79126f9) the recipes may use
TABBY_MODEL_KEYS = {"model_dir", "model_name", "max_seq_len", "cache_size", "cache_mode", "chunk_size", "max_batch_size",
                    "gpu_split_auto", "gpu_split", "autosplit_reserve"}
GGUF_CACHES = ("f16", "q8_0", "q4_0", "q8_0/q4_0", "q8_0/f16", "q4_0/f16")
HOSTILE = (
    "/models/Llama-3-exl2-4.0bpw;touch${IFS}/tmp/x;#",
    "/m/it's \"quoted\" $(id) `id` \\ back",
    "/m/new\nline\tand\x1b[31mred",
    "/m/ünïcode 模型 \u2028 sep \u202e evil",
    "-m",
)


def spec(fmt: str = "exl2", cache: str = "q4", split: Split = Split(), path: str = "/models/My Model", **kw) -> RunSpec:
    return RunSpec(fmt=fmt, label="x", model_path=path, max_seq_len=kw.pop("ctx", 6144), cache=cache, split=split, **kw)


def argv_via_bash(line: str, program: str, cwd: Path | None = None) -> list[str]:
    """The argv a shell line hands to ``program``: run it in bash with ``program`` replaced by a
    function that prints its arguments (nothing else runs)."""
    assert line.count(program + " ") >= 1
    prefix, _, rest = line.partition(program + " ")
    script = 'show() { printf "%s\\0" "$@"; }\n' + prefix + "show " + rest
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, cwd=cwd).stdout
    return out.decode().split("\0")[:-1]


# ----- exl2: every cache mode and split ---------------------------------------------------------------

@pytest.mark.parametrize("cache", EXL2_CACHES)
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_exl2_script_line_parses_to_intended_argv(cache: str, split_name: str) -> None:
    split = SPLITS[split_name]
    r = recipe(spec(cache=cache, split=split), tool="script")
    if split_name == "auto-reserve":
        assert not r.supported and "reserve" in r.notes[0]
        return
    words = shlex.split(r.text)
    i = words.index("python")
    assert words[0] == ENV_WORD and words[i + 1] == "examples/chat.py"
    args = words[i + 2:]
    assert args[args.index("-m") + 1] == "/models/My Model" and args[args.index("-l") + 1] == "6144"
    flag = {"fp16": None, "fp8": "-c8", "q8": "-cq8", "q6": "-cq6", "q4": "-cq4"}[cache]
    assert (flag in args) if flag else not any(a.startswith(("-c8", "-cq")) for a in args)
    gs = {"single": None, "manual": "10,15.5", "auto": "auto"}[split_name]
    assert (args[args.index("-gs") + 1] == gs) if gs else "-gs" not in args
    assert "-chunk" not in args


@pytest.mark.parametrize("cache", EXL2_CACHES)
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_exl2_tabby_block_is_yaml_with_the_intended_values(cache: str, split_name: str) -> None:
    split = SPLITS[split_name]
    r = recipe(spec(cache=cache, split=split, path="/models/Smaug-exl2"), tool="tabby")
    if cache == "fp8":
        assert not r.supported and "FP8" in r.notes[0]
        return
    doc = yaml.safe_load(r.text)
    m = doc["model"]
    assert set(doc) == {"model", "memory"} and set(m) <= TABBY_MODEL_KEYS
    assert (m["model_dir"], m["model_name"]) == ("/models", "Smaug-exl2")
    assert m["max_seq_len"] == 6144 and m["cache_size"] == 6144 and m["chunk_size"] == 2048
    assert m["cache_mode"] == {"fp16": "FP16", "q8": "Q8", "q6": "Q6", "q4": "Q4"}[cache]
    assert doc["memory"] == {"cuda_malloc_async": False}
    assert ENV_WORD in r.text  # the start line
    if split_name == "single":
        assert "gpu_split" not in m and "autosplit_reserve" not in m
        assert any("CUDA_VISIBLE_DEVICES=0" in n for n in r.notes)
    elif split_name == "manual":
        assert m["gpu_split_auto"] is False and m["gpu_split"] == [10, 15.5]
    else:
        want = [192, 64] if split_name == "auto" else [512, 128]  # MiB, as TabbyAPI reads it
        assert m["gpu_split_auto"] is True and m["autosplit_reserve"] == want


@pytest.mark.parametrize("cache", EXL2_CACHES)
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_exl2_webui_line(cache: str, split_name: str) -> None:
    r = recipe(spec(cache=cache, split=SPLITS[split_name], path="/models/Smaug-exl2"), tool="webui")
    if split_name == "auto-reserve":
        assert not r.supported
        return
    words = shlex.split(r.text)
    i = words.index("python")
    assert words[0] == ENV_WORD and words[i + 1] == "server.py"
    pairs = dict(zip(words[i + 2::2], words[i + 3::2], strict=False))
    assert pairs["--model-dir"] == "/models" and pairs["--model"] == "Smaug-exl2"
    assert pairs["--loader"] == "ExLlamav2_HF" and pairs["--max_seq_len"] == "6144" and pairs["--cache_type"] == cache
    assert ("--autosplit" in words) == (split_name == "auto")
    assert ("--gpu-split" in words) == (split_name == "manual")


@pytest.mark.parametrize("cache", EXL2_CACHES)
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_exl2_python_lines_compile_and_load_in_order(cache: str, split_name: str) -> None:
    r = recipe(spec(cache=cache, split=SPLITS[split_name]), tool="python")
    ast.parse(r.text)
    lines = r.text.splitlines()
    assert ENV in lines[0] and EXPANDABLE in lines[0]  # before exllamav2 (and torch) is imported
    assert "import" in lines[1] and "ExLlamaV2Cache" in lines[1]
    if split_name.startswith("auto"):
        assert r.text.index("lazy=True") < r.text.index("load_autosplit(cache")
        assert ("reserve_vram=[536870912, 134217728]" in r.text) == (split_name == "auto-reserve")


def test_exl2_batch_and_chunk_are_carried_or_refused() -> None:
    s = spec(batch_size=2, chunk_len=512, flash_attn=True)
    assert not recipe(s, tool="script").supported and not recipe(s, tool="webui").supported
    m = yaml.safe_load(recipe(s, tool="tabby").text)["model"]
    assert m["max_batch_size"] == 2 and m["cache_size"] == 2 * 6144 and m["chunk_size"] == 512
    assert not recipe(spec(batch_size=2), tool="tabby").supported  # batch needs flash attention (paged) in TabbyAPI
    assert shlex.split(recipe(spec(chunk_len=512), tool="script").text)[-3:] == ["-chunk", "512", "-nsdpa"]
    assert not recipe(spec(chunk_len=512), tool="webui").supported
    assert "config.max_batch_size = 2" in recipe(s, tool="python").text


def test_exl2_has_no_llama_cpp_recipe() -> None:
    r = recipe(spec(), tool="llama.cpp")
    assert not r.supported and "GGUF" in r.notes[0]


# ----- GGUF -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cache", GGUF_CACHES)
@pytest.mark.parametrize("split_name", ["single", "manual", "auto"])
def test_gguf_llama_server_line(cache: str, split_name: str) -> None:
    r = recipe(spec(fmt="gguf", cache=cache, split=SPLITS[split_name], path="/m/tiny Q4_0.gguf"), tool="llama.cpp")
    words = shlex.split(r.text)
    assert words[0] == "llama-server" and ENV not in r.text  # llama.cpp does not use PyTorch's allocator
    opts = dict(zip(words[1::2], words[2::2], strict=False))
    k, _, v = cache.partition("/")
    assert opts["-m"] == "/m/tiny Q4_0.gguf" and opts["-c"] == "6144"
    assert (opts["-ctk"], opts["-ctv"]) == (k, v or k)
    assert opts["-fa"] == ("on" if (v or k) != "f16" else "off")
    assert opts["-ngl"] == "999" and opts["-np"] == "1"
    assert opts["-sm"] == ("none" if split_name == "single" else "layer")
    assert opts.get("-ts") == {"single": None, "manual": "10,15.5", "auto": "1,1"}[split_name]


@pytest.mark.parametrize("cache", GGUF_CACHES)
def test_gguf_python_and_webui(cache: str) -> None:
    s = spec(fmt="gguf", cache=cache, split=SPLITS["manual"], path="/m/a.gguf", n_gpu_layers=20)
    py = recipe(s, tool="python").text
    tree = ast.parse(py)
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "Llama")
    kw = {k.arg: k.value for k in call.keywords}
    assert ast.literal_eval(kw["model_path"]) == "/m/a.gguf" and ast.literal_eval(kw["n_gpu_layers"]) == 20
    assert ast.literal_eval(kw["tensor_split"]) == [10.0, 15.5] and ast.literal_eval(kw["n_ctx"]) == 6144
    assert ast.unparse(kw["type_k"]) == f"llama_cpp.GGML_TYPE_{cache.partition('/')[0].upper()}"
    w = recipe(s, tool="webui")
    if "/" in cache:
        assert not w.supported and cache in w.notes[0]
    else:
        words = shlex.split(w.text)
        assert words[words.index("--cache-type") + 1] == {"f16": "fp16"}.get(cache, cache)
        assert words[words.index("--tensor-split") + 1] == "10,15.5" and words[words.index("--gpu-layers") + 1] == "20"


def test_gguf_has_no_tabby_or_script_recipe() -> None:
    for tool in ("tabby", "script"):
        assert not recipe(spec(fmt="gguf", cache="f16"), tool=tool).supported


# ----- quoting against hostile names ------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_paths_reach_the_program_unchanged(path: str, tmp_path: Path) -> None:
    pwned = tmp_path / "x"
    path = path.replace("/tmp/x", str(pwned))
    for fmt, cache, tool, program, flag in (("exl2", "q4", "script", "python", "-m"),
                                             ("gguf", "q8_0", "llama.cpp", "llama-server", "-m")):
        argv = argv_via_bash(recipe(spec(fmt=fmt, cache=cache, path=path), tool=tool).text, program)
        assert argv[argv.index(flag) + 1] == path
    webui = argv_via_bash(recipe(spec(path=path), tool="webui").text, "python")
    head, _, name = path.rpartition("/")
    assert webui[webui.index("--model") + 1] == name and webui[webui.index("--model-dir") + 1] == (head or ".")
    assert not pwned.exists()
    doc = yaml.safe_load(recipe(spec(path=path), tool="tabby").text)
    assert (doc["model"]["model_dir"], doc["model"]["model_name"]) == (head or ".", name)
    for fmt, cache in (("exl2", "q4"), ("gguf", "f16")):
        tree = ast.parse(recipe(spec(fmt=fmt, cache=cache, path=path), tool="python").text)
        consts = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
        assert path in consts


def test_control_characters_never_reach_the_terminal_raw() -> None:
    q = sh_quote("a\x1b[31mb\nc")
    assert "\x1b" not in q and "\n" not in q and q.startswith("$'")
    y = yaml_str("a\x1b\u2028\"\\b")
    assert "\x1b" not in y and "\u2028" not in y and yaml.safe_load(y) == "a\x1b\u2028\"\\b"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_hub_variant_path_and_download_command_are_quoted(tmp_path: Path) -> None:
    rev = "4.0bpw;touch${IFS}x;#"  # a valid git branch name
    loc = Location(kind="hub", repo_id="org/Model-exl2", revision=rev)
    assert model_path(loc, fmt="exl2") == f"Model-exl2-{rev}" == loc.local_dir
    argv = argv_via_bash(loc.download_command(), "hf", cwd=tmp_path)
    assert argv == ["download", "org/Model-exl2", "--revision", rev, "--local-dir", f"Model-exl2-{rev}"]
    line = recipe(spec(path=model_path(loc, fmt="exl2")), tool="script").text
    got = argv_via_bash(line, "python", cwd=tmp_path)
    assert got[got.index("-m") + 1] == f"Model-exl2-{rev}"
    assert not (tmp_path / "x").exists()
    assert any("absolute path" in n for n in recipe(spec(path=model_path(loc, fmt="exl2")), tool="tabby").notes)
    assert not any("absolute path" in n for n in recipe(spec(path="/abs/m"), tool="tabby").notes)
    gg = Location(kind="hub", repo_id="org/M-GGUF", revision="main", subfolder="q4", files=("M-Q4_0.gguf",))
    assert model_path(gg, fmt="gguf") == "M-GGUF/q4/M-Q4_0.gguf"


# ----- option parsing, split labels -------------------------------------------------------------------

def test_recipe_option_and_split_labels() -> None:
    assert parse_recipe_option("auto") == () and parse_recipe_option("all") == TOOLS
    assert parse_recipe_option("Tabby, script,tabby") == ("tabby", "script")
    with pytest.raises(BadOptionError, match="unknown --recipe 'ollama'"):
        parse_recipe_option("tabby,ollama")
    for s in SPLITS.values():
        assert split_from_label(s.label, reserve_bytes=s.reserve_bytes) == s


# ----- fit output ---------------------------------------------------------------------------------------

def _fit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from optimizer.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


EXAMPLE = Path(__file__).resolve().parents[1] / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"


def test_fit_on_the_example_prints_a_tabby_block_and_a_script_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _fit(["fit", "-m", str(EXAMPLE), "--vram", "15GiB"], capsys)
    assert code == 0
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "model:") - 1
    block = []
    for ln in lines[start:]:
        if ln.strip().startswith("note:") or not ln.startswith("    "):
            break
        block.append(ln[4:])
    doc = yaml.safe_load("\n".join(block))
    assert doc["model"]["model_name"] == EXAMPLE.name
    cache = {"FP16": "fp16", "Q8": "q8", "Q6": "q6", "Q4": "q4"}[doc["model"]["cache_mode"]]
    ctx = doc["model"]["max_seq_len"]
    recs = json.loads(_fit(["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--json"], capsys)[1])
    assert ctx == next(r["max_ctx"] for r in recs if r["cache"] == cache)  # the block runs fit's answer
    flag = {"fp16": [], "q8": ["-cq8"], "q6": ["-cq6"], "q4": ["-cq4"]}[cache]
    script = next(ln.strip() for ln in lines[start + len(block):] if "examples/chat.py -m" in ln)
    words = shlex.split(script)
    assert words[0] == ENV_WORD and words[words.index("-m") + 1] == str(EXAMPLE)
    assert words[words.index("-l") + 1] == str(ctx) and words[words.index("-l") + 2:] == [*flag, "-nsdpa"]
    others = [ln for ln in lines if f"examples/chat.py -m {EXAMPLE}" in ln]
    assert len(others) == len(recs)  # one line for every answer
    assert "expandable_segments:True" in out and "fragmentation" in out


def test_fit_recipe_option_json_and_csv(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = _fit(["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--recipe", "python,webui"], capsys)
    assert code == 0 and "ExLlamaV2Config(" in out and "--loader ExLlamav2_HF" in out and "TabbyAPI" not in out
    code, out, _ = _fit(["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--recipe", "all", "--json"], capsys)
    recs = json.loads(out)
    by = {r["cache"]: r for r in recs}
    assert "FP8" in by["fp8"]["recipe_tabby"] and "cache_mode: Q4" in by["q4"]["recipe_tabby"]
    assert "GGUF" in by["q4"]["recipe_llama.cpp"]
    csv_path = tmp_path / "fit.csv"
    assert _fit(["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--csv", str(csv_path)], capsys)[0] == 0
    import csv

    rows = list(csv.DictReader(csv_path.open()))
    assert all(r["recipe_script"].startswith(ENV_WORD) and "model:" in r["recipe_tabby"] for r in rows if r["cache"] != "fp8")
    code, _, err = _fit(["fit", "-m", str(EXAMPLE), "--vram", "15GiB", "--recipe", "ollama"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--recipe" in err


def test_fit_on_a_gguf_prints_a_llama_server_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("gguf")
    from gguf_util import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    code, out, _ = _fit(["fit", "-m", str(path), "--vram", "2GB"], capsys)
    assert code == 0
    line = next(ln.strip() for ln in out.splitlines() if ln.strip().startswith("llama-server "))
    words = shlex.split(line)
    recs = json.loads(_fit(["fit", "-m", str(path), "--vram", "2GB", "--json"], capsys)[1])
    by = {(r["max_ctx"], r["cache"]) for r in recs}
    k, v = words[words.index("-ctk") + 1], words[words.index("-ctv") + 1]
    assert (int(words[words.index("-c") + 1]), k if k == v else f"{k}/{v}") in by
    assert words[words.index("-m") + 1] == str(path) and ENV not in out.split("How to run:")[1]


@pytest.mark.parametrize("flash", [False, True])
def test_exl2_recipes_select_the_causal_path_without_flash_attn(flash: bool) -> None:
    """Without flash-attn exllamav2 0.3.2's SDPA branch is not causal for prompts: every exl2 recipe then
    selects the matmul path (which exl2opt measures and sizes); with flash-attn none of them does."""
    from dataclasses import replace

    base = replace(spec(cache="q4", split=SPLITS["single"], path="/models/Smaug-exl2"), flash_attn=flash)
    script = shlex.split(recipe(base, tool="script").text)
    webui = shlex.split(recipe(base, tool="webui").text)
    tabby = recipe(base, tool="tabby").text
    python = recipe(base, tool="python").text
    assert ("-nsdpa" in script) is (not flash)
    assert ("EXLLAMA_NO_SDPA=1" in webui[:webui.index("python")]) is (not flash)
    assert ("EXLLAMA_NO_SDPA=1" in tabby.splitlines()[-1]) is (not flash)
    assert ("config.no_sdpa = True" in python) is (not flash)
    chunked = recipe(replace(base, chunk_len=512), tool="python").text
    assert "config.max_attention_size = 512 ** 2" in chunked  # as chat.py's -chunk sets it
