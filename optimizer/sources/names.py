"""Checks for every name that reaches a path, a URL or a shell: revisions, branches, repo file paths.

A revision typed by the user or a branch name listed by a Hub is accepted only when it is a valid
git ref name (``git check-ref-format --allow-onelevel`` rules) and, in addition, holds no ``..``,
does not start with ``/`` and holds no control character. A file path listed by a Hub must be a
relative POSIX path without empty, ``.`` or ``..`` parts, backslashes or control characters. Neither
may start with ``-`` (in a printed command it would read as an option, quoting or not).
Commit ids must be 40 lowercase hex digits. Server-chosen values such as ETags are never checked
here because they never become paths (see ``optimizer.sources.http``).
"""

from __future__ import annotations

import re

from optimizer.errors import ModelSourceError

#: Longest revision / branch name accepted (git allows more; the Hub and file systems do not).
MAX_REVISION_CHARS = 200
#: Longest repo file path accepted.
MAX_PATH_CHARS = 1000

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# git check-ref-format rule 4/5/10: control characters, space, ~ ^ : ? * [ \ ; plus C1 controls and DEL
_REF_BAD_CHARS_RE = re.compile(r"[\x00-\x20\x7f-\x9f~^:?*\[\\]")
_PATH_BAD_CHARS_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


def is_commit(text: object) -> bool:
    """Whether ``text`` is a full commit id (40 lowercase hex digits)."""
    return isinstance(text, str) and bool(_SHA_RE.match(text))


def revision_problem(name: str) -> str | None:
    """Why ``name`` is not an acceptable revision/branch name, or None when it is."""
    if not name:
        return "it is empty"
    if len(name) > MAX_REVISION_CHARS:
        return f"it is longer than {MAX_REVISION_CHARS} characters"
    if _REF_BAD_CHARS_RE.search(name):
        return "it holds a space, a control character or one of ~ ^ : ? * [ \\"
    if ".." in name:
        return "it holds '..'"
    if name.startswith("-"):
        return "it starts with '-' (it would read as an option in a command)"
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return "it starts or ends with '/' or holds '//'"
    if name.endswith(".") or name == "@" or "@{" in name:
        return "it ends with '.', is '@' or holds '@{'"
    for part in name.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            return "a part starts with '.' or ends with '.lock'"
    return None


def check_revision(name: str, *, where: str) -> str:
    """``name`` when it is a valid revision; else a one-line :class:`ModelSourceError` (exit 2)."""
    why = revision_problem(name)
    if why is not None:
        from optimizer.textsafe import safe

        raise ModelSourceError(f"{safe(where)}: invalid revision {safe(repr(name))}: {why} (git ref rules)")
    return name


def path_problem(path: str) -> str | None:
    """Why a repo file path is unacceptable (escapes its folder, control characters...), or None."""
    if not path or len(path) > MAX_PATH_CHARS:
        return "empty or too long"
    if _PATH_BAD_CHARS_RE.search(path):
        return "holds a control character or a backslash"
    if path.startswith("/"):
        return "is absolute"
    if path.startswith("-"):
        return "starts with '-' (it would read as an option in a command)"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' part"
    return None


def safe_repo_paths(paths: list[str]) -> tuple[list[str], list[str]]:
    """(acceptable paths, refused paths) of a file listing."""
    good: list[str] = []
    bad: list[str] = []
    for p in paths:
        (bad if path_problem(p) else good).append(p)
    return good, bad
