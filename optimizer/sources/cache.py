"""On-disk cache of Hub metadata (refs, config.json, tensor tables) so a repeated run works offline.

Layout under the cache root (default ``~/.cache/exl2opt``, or ``EXL2OPT_CACHE``)::

    hub/<org>--<name>/refs.json                 branches/tags with their commit sha
    hub/<org>--<name>/revisions/<hash>.json     revision -> commit sha and snapshot key
    hub/<org>--<name>/snapshots/<key>.json      variants found at that snapshot (config + tensors)

``<hash>`` is the SHA-256 of the revision name (a name never becomes a path; the name is stored in
the file and checked on read). ``<key>`` is the commit sha when it is known (so a moved branch
never reuses stale data), otherwise ``rev-<hash>``. ``<org>`` and ``<name>`` are parts of a repo id
already checked against the Hub's rules (letters, digits, ``.``, ``_``, ``-``, starting alphanumeric).
Files are JSON, written atomically, and refused when larger than
:data:`MAX_CACHE_FILE_BYTES`; an unreadable or corrupt file counts as a miss. Nothing here ever
holds a token: only public metadata (names, sizes, config.json, safetensors header tables).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from optimizer.errors import HubError
from optimizer.sources.names import revision_problem
from optimizer.variant import TensorInfo

#: Largest cache file read or written, in bytes (a 400B model's tensor table is a few MB).
MAX_CACHE_FILE_BYTES = 64 * 2**20

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_SNAPSHOT_KEY_RE = re.compile(r"^(?:rev-)?[0-9a-f]{40}$")


def default_cache_dir() -> Path:
    """``EXL2OPT_CACHE`` if set, else ``$XDG_CACHE_HOME/exl2opt`` or ``~/.cache/exl2opt``."""
    env = os.environ.get("EXL2OPT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "exl2opt"


def _safe(name: str) -> str:
    """A file-name-safe, reversible spelling of a repo id part."""
    return quote(name, safe="._-")


def _key(name: str) -> str:
    """A fixed-length file name for a revision name (never the name itself)."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:40]


@dataclass(frozen=True)
class MetaCache:
    """The metadata cache of one cache root (bytes on disk are bounded per file)."""

    root: Path

    def _repo_dir(self, repo_id: str) -> Path:
        org, _, name = repo_id.partition("/")
        return self.root / "hub" / f"{_safe(org)}--{_safe(name)}"

    # ----- low level -------------------------------------------------------------------------

    def _read(self, path: Path) -> Any | None:
        try:
            if path.stat().st_size > MAX_CACHE_FILE_BYTES:
                return None
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            return None

    def _write(self, path: Path, doc: Any) -> None:
        data = json.dumps(doc, separators=(",", ":"), sort_keys=True)
        if len(data) > MAX_CACHE_FILE_BYTES:
            return  # too big to cache: the run still works online
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            return  # a read-only or full cache must not break an online run

    # ----- refs ------------------------------------------------------------------------------

    def save_refs(self, repo_id: str, refs: list[dict[str, str | None]]) -> None:
        """Store ``[{"name", "kind" ("branch"|"tag"), "commit"}]`` for a repo."""
        self._write(self._repo_dir(repo_id) / "refs.json", {"repo_id": repo_id, "saved_at": time.time(), "refs": refs})

    def load_refs(self, repo_id: str) -> list[dict[str, str | None]] | None:
        doc = self._read(self._repo_dir(repo_id) / "refs.json")
        if not isinstance(doc, dict) or doc.get("repo_id") != repo_id or not isinstance(doc.get("refs"), list):
            return None
        out = []
        for r in doc["refs"]:
            if isinstance(r, dict) and isinstance(r.get("name"), str) and revision_problem(r["name"]) is None:
                c = r.get("commit")
                out.append({"name": r["name"], "kind": str(r.get("kind") or "branch"),
                            "commit": c if isinstance(c, str) else None})
        return out

    # ----- snapshots -------------------------------------------------------------------------

    @staticmethod
    def snapshot_key(*, revision: str, commit: str | None) -> str:
        if commit and _SHA_RE.match(commit):
            return commit
        return "rev-" + _key(revision)

    def save_snapshot(self, repo_id: str, *, revision: str, commit: str | None, variants: list[dict[str, Any]]) -> None:
        """Store the variants found at ``revision`` (resolved to ``commit`` when known)."""
        key = self.snapshot_key(revision=revision, commit=commit)
        d = self._repo_dir(repo_id)
        self._write(d / "snapshots" / f"{key}.json",
                    {"repo_id": repo_id, "commit": commit, "revision": revision, "variants": variants})
        self._write(d / "revisions" / f"{_key(revision)}.json",
                    {"repo_id": repo_id, "revision": revision, "commit": commit, "snapshot": key, "saved_at": time.time()})

    def load_snapshot_by_commit(self, repo_id: str, commit: str | None) -> list[dict[str, Any]] | None:
        """Variants cached for an exact commit sha (valid whatever branch name points at it)."""
        if not commit or not _SHA_RE.match(commit):
            return None
        return self._load_snapshot(repo_id, commit)

    def load_snapshot_by_revision(self, repo_id: str, revision: str) -> tuple[str | None, list[dict[str, Any]]] | None:
        """(commit, variants) last seen for a revision name, or None when never cached."""
        doc = self._read(self._repo_dir(repo_id) / "revisions" / f"{_key(revision)}.json")
        if (not isinstance(doc, dict) or doc.get("repo_id") != repo_id or doc.get("revision") != revision
                or not isinstance(doc.get("snapshot"), str)):
            return None
        variants = self._load_snapshot(repo_id, doc["snapshot"])
        if variants is None:
            return None
        commit = doc.get("commit")
        return (commit if isinstance(commit, str) else None), variants

    def _load_snapshot(self, repo_id: str, key: str) -> list[dict[str, Any]] | None:
        if not _SNAPSHOT_KEY_RE.match(key):
            return None
        doc = self._read(self._repo_dir(repo_id) / "snapshots" / f"{key}.json")
        if not isinstance(doc, dict) or doc.get("repo_id") != repo_id or not isinstance(doc.get("variants"), list):
            return None
        return [v for v in doc["variants"] if isinstance(v, dict)]


def tensors_from_rows(rows: list[Any], *, where: str) -> tuple[TensorInfo, ...]:
    """Cached ``[name, dtype, shape, nbytes]`` rows back to :class:`TensorInfo` (exl2 and GGUF documents).

    Raises:
        HubError: a row is malformed (the cache is corrupt).
    """
    try:
        return tuple(
            TensorInfo(name=str(n), dtype=str(dt), shape=tuple(int(x) for x in shape), nbytes=int(nb))
            for n, dt, shape, nb in rows
        )
    except (TypeError, ValueError):
        raise HubError(f"{where}: cached metadata is corrupt; delete the exl2opt cache and retry") from None

