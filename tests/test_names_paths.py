"""Names that reach a path or a shell (issue 9, classes 1 and 2): revisions, branches, repo paths,
ETags and commits from a hostile Hub, and the download commands we print or write.

Properties are checked over generated names (hypothesis), the red-team examples as fixed cases.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from fakehub import FakeFile, FakeRepo, exl2_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer.errors import ModelSourceError
from optimizer.sources import HubOptions, RepoSpec, parse_repo_spec
from optimizer.sources.download import local_path
from optimizer.sources.hub import discover_hub, discover_hub_detailed
from optimizer.sources.names import check_revision, path_problem, revision_problem
from optimizer.variant import Location

ROOT = Path(__file__).resolve().parents[1]
INJECT = "4.0bpw;touch${IFS}/tmp/x;#"
# names built from the characters that matter: separators, dots, shell and git metacharacters
NAME_CHARS = st.sampled_from(list("ab0./-_@{}~^:?*[\\;$`'\" \t\n\x1b\x00#&|<>()!%+=,") + ["\u202e", "\x9b", "é"])
NAMES = st.text(NAME_CHARS, min_size=0, max_size=24)


def _git_accepts(name: str) -> bool:
    if "\x00" in name:
        return False
    r = subprocess.run(["git", "check-ref-format", "--allow-onelevel", "refs/heads/" + name], capture_output=True)
    return r.returncode == 0


@settings(max_examples=300, deadline=None)
@given(NAMES)
def test_accepted_revision_is_a_git_ref_and_cannot_leave_a_folder(name):
    if revision_problem(name) is not None:
        with pytest.raises(ModelSourceError):
            check_revision(name, where="org/x")
        return
    assert _git_accepts(name), f"accepted {name!r} but git refuses it"
    assert ".." not in name and not name.startswith("/") and not any(ord(c) < 32 or 0x7F <= ord(c) <= 0x9F for c in name)
    root = Path("/cache/refs").resolve()
    assert root in (root / name).resolve().parents


@settings(max_examples=150, deadline=None)
@given(NAMES)
def test_git_refs_without_dotdot_or_controls_are_accepted(name):
    """No false refusals of ordinary refs: whatever git accepts (and is printable) we accept."""
    if (_git_accepts(name) and not any(0x7F <= ord(c) <= 0x9F for c in name) and not name.startswith("-")
            and name not in ("", "@")):  # git refuses a lone '@' as a ref (rule 9), we refuse it too
        assert revision_problem(name) is None, name


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(NAME_CHARS, min_size=0, max_size=8), min_size=1, max_size=4).map("/".join))
def test_accepted_repo_path_stays_inside_its_folder(path):
    if path_problem(path) is not None:
        return
    root = Path("/cache/weights/k").resolve()
    assert root in (root / path).resolve().parents


@pytest.mark.parametrize("text", ["org/x@../../../tmp/f", "org/x@/etc/passwd", "org/x@a/../../b", "org/x@a\x1b]52;c;x\x07",
                                  "org/x@.hidden", "org/x@a..b", "org/x@x.lock"])
def test_bad_revisions_are_refused_before_any_request(text):
    with pytest.raises(ModelSourceError) as e:
        parse_repo_spec(text)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_cli_plan_with_traversal_revision_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "EXL2OPT_CACHE": str(tmp_path / "c")}
    r = subprocess.run([sys.executable, "-m", "optimizer", "plan", "-m", "org/x@../../../../tmp/f", "--vram", "8GB"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid revision" in r.stderr, r.stderr
    assert not (tmp_path / "f").exists()


# ----- the download command ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(rev=NAMES, sub=st.one_of(st.none(), NAMES.filter(bool)), files=st.lists(NAMES.filter(bool), max_size=3),
       gguf=st.booleans())
def test_download_command_parses_back_to_exactly_its_arguments(rev, sub, files, gguf):
    """Whatever the names, ``shlex.split`` of the printed command gives back the same values:
    nothing in a name can end the argument, start a second command or expand a variable."""
    names = tuple(f + ".gguf" for f in files) if gguf else tuple(files)
    loc = Location(kind="hub", repo_id="org/Model-exl2", revision=rev or None, subfolder=sub, files=names)
    argv = shlex.split(loc.download_command())
    assert argv[:3] == ["hf", "download", "org/Model-exl2"]
    if loc.is_gguf_files:
        assert argv[3:3 + len(names)] == [f"{sub}/{f}" if sub else f for f in names]
    elif sub:
        assert argv[argv.index("--include") + 1] == f"{sub}/*"
    if rev and rev != "main":
        assert argv[argv.index("--revision") + 1] == rev
    assert argv[-2] == "--local-dir"


def test_pasting_the_download_command_of_an_injecting_branch_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    rev = f"4.0bpw;touch${{IFS}}{marker};#"
    loc = Location(kind="hub", repo_id="org/x", revision=rev, subfolder="q'$(touch " + str(marker) + ")")
    cmd = loc.download_command().replace("hf download", "true", 1)
    subprocess.run(["bash", "-c", cmd], check=True, timeout=30)
    assert not marker.exists()


# ----- a hostile Hub -------------------------------------------------------------------------


def _tree_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_hostile_branch_names_etags_and_commits_write_nothing_outside_the_cache(fake_hub, tmp_path, monkeypatch):
    files, _ = exl2_files(4.0, 6)
    full = {k: FakeFile(v.data) for k, v in files.items()}
    target = tmp_path / "target"
    up = "../" * 12
    fake_hub.add(FakeRepo("org/evil", {
        "4.0bpw": full,
        f"{up}{target}": full,
        INJECT: full,
    }))
    fake_hub.listed_commits["4.0bpw"] = f"{up}{target}-commit"
    fake_hub.resolve_headers.update({"ETag": f'"{up}{target}-etag"', "X-Repo-Commit": f"{up}{target}-xrc"})
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    outside = tmp_path / "outside"
    outside.mkdir()
    monkeypatch.chdir(outside)
    before = _tree_files(tmp_path)
    found = discover_hub_detailed(spec=RepoSpec("org/evil"), options=HubOptions(endpoint=fake_hub.endpoint))
    revs = {v.location.revision for v in found.variants}
    assert revs == {"4.0bpw", INJECT}, revs  # the traversal branch is left out
    assert any("ignored" in s and "'..'" in s for s in found.skipped)
    for v in found.variants:
        assert v.location.commit is None or len(v.location.commit) == 40
        assert shlex.split(v.location.download_command())[4] == v.location.revision  # --revision <rev>, one word
        path = Path(local_path(v))  # the measurement-time download, same hostile headers
        assert (path / "config.json").is_file()
    cache = Path(os.environ["EXL2OPT_CACHE"]).resolve()
    new = _tree_files(tmp_path) - before
    stray = sorted(str(p) for p in new if p.resolve() != cache and cache not in p.resolve().parents)
    assert new and not stray, stray
    assert not list(tmp_path.glob("target*"))


def test_revision_from_the_user_with_dotdot_never_reaches_the_hub(fake_hub, tmp_path):
    with pytest.raises(ModelSourceError):
        discover_hub(spec=parse_repo_spec("org/x@../../x") or RepoSpec("org/x"),
                     options=HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(tmp_path)))
    assert fake_hub.requests == []


def test_unsafe_paths_in_a_listing_are_ignored(fake_hub, tmp_path):
    files, _ = exl2_files(4.0, 6)
    evil = {"a\x1b]52;c;aGk=\x07/" + k: v for k, v in files.items()}
    fake_hub.add(FakeRepo("org/mixed", {"main": {**files, **evil}}))
    found = discover_hub_detailed(spec=RepoSpec("org/mixed"),
                                  options=HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(tmp_path)))
    assert [v.location.subfolder for v in found.variants] == [None]
    assert found.skipped and "\x1b" not in found.skipped[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(etag=st.text(NAME_CHARS, min_size=1, max_size=30).filter(lambda s: "\n" not in s and "\x00" not in s
                                                                   and "\r" not in s and "\x1b" not in s))
def test_any_etag_is_harmless(fake_hub, tmp_path, etag):
    """ETags and X-Repo-Commit values are never used as paths, whatever they hold."""
    files, _ = exl2_files(4.0, 6)
    fake_hub.repos.clear()
    fake_hub.add(FakeRepo("org/e", {"main": {k: FakeFile(v.data) for k, v in files.items()}}))
    fake_hub.resolve_headers.update({"ETag": etag.encode("latin-1", "replace").decode("latin-1"),
                                     "X-Repo-Commit": etag.encode("latin-1", "replace").decode("latin-1")})
    cache = tmp_path / "c"
    (v,) = discover_hub(spec=RepoSpec("org/e"), options=HubOptions(endpoint=fake_hub.endpoint, cache_dir=str(cache)))
    assert v.location.revision == "main"
