"""Commands that exl2opt prints for the user to run, pulled out of its output so tests can run them.

A printed command is either in backticks (`exl2opt report S`) or follows a label at the start of a
line (``Report: exl2opt report S``).
"""

from __future__ import annotations

import os
import re
import shlex
import sys

_BACKTICK = re.compile(r"`(exl2opt [^`]+)`")
_LABELLED = re.compile(r"^\s*[A-Z][A-Za-z ]*:\s+(exl2opt (?:plan|fit|search|worker|report)\b.*)$", re.MULTILINE)


def printed_commands(text: str) -> list[str]:
    """Every exl2opt command in ``text``, in order, without duplicates."""
    found = [m.group(1) for m in _BACKTICK.finditer(text)] + [m.group(1).strip() for m in _LABELLED.finditer(text)]
    return list(dict.fromkeys(found))


def argv_of(command: str, env: dict[str, str] | None = None) -> list[str]:
    """``exl2opt ...`` as the argv of this interpreter's ``python -m optimizer ...`` (shell words,
    ``$VAR`` expanded from ``env`` as a shell would)."""
    words = shlex.split(command)
    assert words[0] == "exl2opt", command
    environ = dict(os.environ if env is None else env)
    expanded = [re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: environ.get(m.group(1) or m.group(2), ""), w) for w in words[1:]]
    return [sys.executable, "-m", "optimizer", *expanded]
