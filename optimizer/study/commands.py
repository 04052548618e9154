"""Commands printed for the user to run (resume a search, add a worker, write the report).

Built in one place so that each one works when pasted: every value is shell-quoted, a non-default
studies directory and the storage are carried along. A storage URL that holds a password is never
printed; the command reads it from ``EXL2OPT_STORAGE`` instead (``--storage "$EXL2OPT_STORAGE"``).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from optimizer.storage import DEFAULT_ROOT, safe_url

#: The environment variable every study command reads ``--storage`` from.
STORAGE_ENV = "EXL2OPT_STORAGE"


def storage_words(storage_url: str | None) -> list[str]:
    """``--storage URL`` as shell words (already quoted); the URL only when it holds no secret."""
    if not storage_url:
        return []
    if safe_url(storage_url) != storage_url:
        return ["--storage", f'"${STORAGE_ENV}"']
    return ["--storage", shlex.quote(storage_url)]


def study_command(command: str, *, study: str, root: Path = DEFAULT_ROOT, storage_url: str | None = None,
                  extra: Sequence[str] = ()) -> str:
    """``exl2opt <command>`` for ``study``: ``report`` takes the study as its argument, ``search`` and
    ``worker`` as ``--study``. ``extra`` are further (unquoted) arguments, quoted here."""
    words = ["exl2opt", command]
    words += [shlex.quote(study)] if command == "report" else ["--study", shlex.quote(study)]
    if Path(root) != DEFAULT_ROOT:
        words += ["--studies-dir", shlex.quote(str(root))]
    words += storage_words(storage_url)
    words += [shlex.quote(str(x)) for x in extra]
    return " ".join(words)


def needs_storage_env(storage_url: str | None) -> bool:
    """Whether a printed command reads the storage URL from :data:`STORAGE_ENV` (it holds a secret)."""
    return bool(storage_url) and safe_url(storage_url or "") != storage_url
