"""Bad input to the whole CLI: one line on stderr, a distinct exit code, no traceback unless --debug.

Each case runs the real console entry point in a subprocess (``python -m optimizer``) with an
isolated HF_HOME / exl2opt cache; Hub cases talk to the loopback fake Hub or a closed local port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from exl2_fixtures import TINY_LLAMA, make_exl2_dir
from fakehub import FakeFile, FakeRepo, exl2_files

from optimizer.errors import EXIT_RUNTIME, EXIT_USAGE

SECRET = "hf_fakeCLIsecret0987654321"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", "EXL2OPT_DEBUG")}
    env.update({"HF_HOME": str(tmp_path / "hf-home"), "EXL2OPT_CACHE": str(tmp_path / "cache"),
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "optimizer", *args], capture_output=True, text=True, env=env, timeout=60)


def _assert_one_line(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("exl2opt: error:"), lines[0]
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """Local model dirs: good, no config.json, malformed JSON, missing dimension, unknown arch."""
    good = make_exl2_dir(tmp_path, "good-4.0bpw", TINY_LLAMA, bits=4.0)
    out = {"good": good}
    for name, text in (
        ("noconfig", None),
        ("badjson", '{"architectures": ["LlamaForCausalLM"], "hidden_size": '),
        ("nodims", json.dumps({k: v for k, v in TINY_LLAMA.items() if k != "num_hidden_layers"})),
        ("unknownarch", json.dumps({**TINY_LLAMA, "architectures": ["FrobnicatorForCausalLM"]})),
    ):
        d = tmp_path / name
        d.mkdir()
        (d / "output.safetensors").write_bytes((good / "output.safetensors").read_bytes())
        if text is not None:
            (d / "config.json").write_text(text)
        out[name] = d
    return out


@pytest.mark.parametrize(
    ("case", "vram", "code", "needle"),
    [
        ("missing", "15GB", EXIT_USAGE, "no such"),
        ("noconfig", "15GB", EXIT_USAGE, "config.json"),
        ("badjson", "15GB", EXIT_USAGE, "not valid JSON"),
        ("nodims", "15GB", EXIT_USAGE, "num_hidden_layers"),
        ("unknownarch", "15GB", EXIT_USAGE, "FrobnicatorForCausalLM"),
        ("good", "15XB", EXIT_USAGE, "15XB"),
        ("good", "0GB", EXIT_USAGE, "0GB"),
        ("good", "-3GB", EXIT_USAGE, "-3GB"),
        ("good", "abc", EXIT_USAGE, "abc"),
    ],
)
def test_local_bad_input(models, tmp_path, case, vram, code, needle):
    path = str(tmp_path / "does-not-exist") if case == "missing" else str(models[case])
    r = _run(["plan", "-m", path, f"--vram={vram}"], _env(tmp_path))
    _assert_one_line(r, code, needle)


def test_good_input_succeeds(models, tmp_path):
    r = _run(["plan", "-m", str(models["good"]), "--vram", "15GB", "--ctx", "4096", "--json"], _env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)


@pytest.fixture
def hub_env(fake_hub, tmp_path):
    files, _ = exl2_files(4.0, 6)
    fake_hub.add(FakeRepo("org/Tiny-exl2", {"main": {"README.md": FakeFile(b"x")}, "4.0bpw": files}))
    gfiles, _ = exl2_files(4.0, 6)
    fake_hub.add(FakeRepo("meta/Gated-exl2", {"main": {"README.md": FakeFile(b"x")}, "4.0bpw": gfiles},
                          gated=True, token=SECRET))
    return fake_hub, _env(tmp_path, HF_ENDPOINT=fake_hub.endpoint)


@pytest.mark.parametrize(
    ("spec", "code", "needle"),
    [
        ("org/nope-exl2", EXIT_USAGE, "not found"),
        ("org/Tiny-exl2@9.9bpw", EXIT_USAGE, "9.9bpw"),
        ("meta/Gated-exl2", EXIT_RUNTIME, "gated"),
    ],
)
def test_hub_bad_input(hub_env, spec, code, needle):
    _, env = hub_env
    r = _run(["plan", "-m", spec, "--vram", "15GB"], env)
    _assert_one_line(r, code, needle)


def test_gated_with_token_works_and_token_is_never_shown(hub_env, tmp_path):
    hub, env = hub_env
    bad = _run(["plan", "-m", "meta/Gated-exl2", "--vram", "15GB"], {**env, "HF_TOKEN": "hf_wrongtoken"})
    _assert_one_line(bad, EXIT_RUNTIME, "gated")
    assert "hf_wrongtoken" not in bad.stderr
    r = _run(["plan", "-m", "meta/Gated-exl2", "--vram", "15GB", "--ctx", "4096"], {**env, "HF_TOKEN": SECRET})
    assert r.returncode == 0, r.stderr
    assert SECRET not in r.stdout + r.stderr
    assert any(req.auth for req in hub.requests)
    for p in (tmp_path / "cache").rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes()


def test_no_network_nothing_cached_fails_fast(tmp_path):
    env = _env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}")
    r = _run(["plan", "-m", "org/Tiny-exl2", "--vram", "15GB"], env)
    _assert_one_line(r, EXIT_RUNTIME, "org/Tiny-exl2")


def test_offline_nothing_cached(tmp_path):
    r = _run(["plan", "-m", "org/Tiny-exl2", "--vram", "15GB", "--offline"], _env(tmp_path))
    _assert_one_line(r, EXIT_RUNTIME, "--offline")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_traceback(models, tmp_path, how):
    args = ["plan", "-m", str(models["badjson"]), "--vram", "15GB"]
    if how == "flag":
        r = _run(["--debug", *args], _env(tmp_path))
    else:
        r = _run(args, _env(tmp_path, EXL2OPT_DEBUG="1"))
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ModelConfigError" in r.stderr


CTRL_C_DURING_IMPORT = """
import builtins, sys
real_import = builtins.__import__
def interrupted(name, *args, **kwargs):
    if name == "optimizer.cli":
        raise KeyboardInterrupt  # as a Ctrl-C would, while typer and the commands are still importing
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupted
from optimizer.entry import main
sys.argv = ["exl2opt", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("debug", [False, True])
def test_ctrl_c_while_the_cli_is_importing_is_one_line(tmp_path, debug):
    """The console script (optimizer.entry:main) turns a Ctrl-C during its own import into exit 130."""
    args = ["--debug"] if debug else []
    r = subprocess.run([sys.executable, "-c", CTRL_C_DURING_IMPORT, *args, "fit", "--help"], capture_output=True,
                       text=True, env=_env(tmp_path), timeout=60)
    if debug:
        assert r.returncode != 0 and "Traceback" in r.stderr and "KeyboardInterrupt" in r.stderr
        return
    assert (r.returncode, r.stderr.strip(), r.stdout) == (130, "exl2opt: interrupted", "")


@pytest.mark.parametrize(("spec", "needle"), [
    ("https://huggingface.co/org/Tiny-exl2", "--model org/Tiny-exl2"),
    ("https://huggingface.co/org/Tiny-exl2/tree/4.0bpw", "--model org/Tiny-exl2@4.0bpw"),
    ("hf.co/org/Tiny-exl2", "not a Hub repo id"),
])
def test_a_pasted_model_page_address_names_the_repo_id(tmp_path, spec, needle):
    r = _run(["plan", "-m", spec, "--vram", "15GB"], _env(tmp_path))
    _assert_one_line(r, EXIT_USAGE, needle)
