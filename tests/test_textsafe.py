"""Printed text (issue 9, class 7): control characters, passwords in URLs, rich markup."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer.storage import safe_url
from optimizer.textsafe import mask_urls, plain, safe, strip_controls

ROOT = Path(__file__).resolve().parents[1]
CONTROLS = [chr(c) for c in [*range(0, 32), *range(0x7F, 0xA0)]] + ["\u202e", "\u2066", "\u200b", "\ufeff"]
PASSWORDS = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"),
                                  blacklist_characters="@/?#&;%"), min_size=4, max_size=20)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_safe_text_holds_no_control_character(text):
    out = safe(text)
    assert not any(c in out for c in CONTROLS)
    if not any(c in text for c in CONTROLS) and "://" not in text and "=" not in text:
        assert out == text  # ordinary names are left alone


@settings(max_examples=300, deadline=None)
@given(user=st.from_regex(r"[a-z]{1,8}", fullmatch=True), pw=PASSWORDS,
       scheme=st.sampled_from(["postgresql+psycopg", "postgresql", "mysql+pymysql", "sqlite", "redis", "https"]),
       where=st.sampled_from(["userinfo", "query", "both"]))
def test_every_printed_url_hides_its_password(user, pw, scheme, where):
    if where == "userinfo":
        url = f"{scheme}://{user}:{pw}@db.example:5432/optuna"
    elif where == "query":
        url = f"{scheme}://{user}@db.example/optuna?sslmode=require&password={pw}"
    else:
        url = f"{scheme}://{user}:{pw}@db.example/optuna?password={pw}"
    for text in (mask_urls(url), safe(f"cannot reach {url} (x)"), safe_url(url)):
        assert pw not in text, text
        assert "***" in text


def test_red_team_urls():
    assert "s3cret" not in safe_url("postgresql+psycopg://u@host/db?password=s3cret")
    assert safe_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["q", "[/b]", "[b]", "[red]", "\\[", "[link=http://x]", ":smile:", " ", "\x1b", "[/]", "]"]),
                max_size=10).map("".join))
def test_names_are_printed_as_plain_text_never_markup(name):
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=200, color_system=None).print(plain(name), soft_wrap=True)
    assert buf.getvalue().rstrip("\n") == strip_controls(name)


def test_osc52_and_markup_folder_names_in_plan(tmp_path):
    """A local folder ``q[/b]`` (folder ``b]`` in ``q[``) or one named with an OSC 52 clipboard write
    prints as visible text (was: rich MarkupError / a raw escape sequence)."""
    import shutil

    src = ROOT / "studies" / "examples" / "Smaug-34B-v0.1-3.0bpw-h6-exl2"
    parent = tmp_path / "models"
    for name in ("q[/b]", "x\x1b]52;c;cHduZWQ=\x07y"):
        shutil.copytree(src, parent / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "500"}
    r = subprocess.run([sys.executable, "-m", "optimizer", "fit", "-m", str(parent / "q[/b]"),
                        "-m", str(parent / "x\x1b]52;c;cHduZWQ=\x07y"), "--vram", "24GB"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "q[/b]" in r.stdout and "\x1b]52" not in r.stdout and "\\x1b]52;c;" in r.stdout


@pytest.mark.parametrize("bad", ["\x1b]52;c;aGk=\x07", "\r\x1b[2K", "\u202etxt.exe"])
def test_error_lines_escape_controls(bad, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "optimizer", "plan", "-m", str(tmp_path / bad), "--vram", "8GB"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert not any(c in r.stderr.rstrip("\n") for c in CONTROLS)


def test_report_with_a_password_in_the_query_never_prints_it():
    """The red-team case: ``report --storage 'postgresql+psycopg://u@host/db?password=s3cret'``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "optimizer", "report", "s", "--storage",
                        "postgresql+psycopg://u:pw1@127.0.0.1:1/db?password=s3cret"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "s3cret" not in r.stdout + r.stderr and "pw1" not in r.stdout + r.stderr and "password=***" in r.stderr


def test_hub_endpoint_credentials_are_never_printed(tmp_path, monkeypatch):
    """An HF_ENDPOINT with user:password@ (a private mirror) is named by host only in messages."""
    from optimizer.errors import OfflineError
    from optimizer.sources import HubOptions, RepoSpec
    from optimizer.sources.hub import discover_hub

    with pytest.raises(OfflineError) as e:
        discover_hub(spec=RepoSpec("org/x"), options=HubOptions(endpoint="http://mirror-user:hunter2@127.0.0.1:9",
                                                                cache_dir=str(tmp_path)))
    assert "hunter2" not in str(e.value) and "mirror-user" not in str(e.value) and "127.0.0.1:9" in str(e.value)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20))
def test_a_variant_label_never_holds_a_control_character(label):
    """Labels come from names and headers (and from stored studies): escaped wherever they are built."""
    from optimizer.variant import Location, Variant

    v = Variant(format="exl2", label=label, location=Location(kind="local", path="/x"), config={}, tensors=())
    assert v.label == strip_controls(label) and not any(c in v.label for c in CONTROLS)
