"""Where variants come from: ``--model`` values resolved to :class:`~optimizer.variant.Variant` lists.

A value that names an existing path is local (``optimizer.sources.local``); ``org/name`` or
``org/name@revision`` is a Hugging Face Hub repository (``optimizer.sources.hub``, imported lazily so
that local use never imports huggingface_hub).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from optimizer.errors import ModelSourceError
from optimizer.variant import Variant

_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: A model page's address as a browser shows it: https://huggingface.co/org/name[/tree/revision]
_HUB_URL_RE = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([^/@\s]+/[^/@\s]+)(?:/tree/([^/\s]+))?/?$")


@dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub. ``token`` is never printed, logged or stored.

    Attributes:
        endpoint: base URL (default: ``HF_ENDPOINT`` or https://huggingface.co).
        token: an access token for gated/private repos (default: ``HF_TOKEN`` / the hf login).
        cache_dir: metadata cache directory (default ``~/.cache/exl2opt``); a repeated run is offline.
        offline: use only the metadata cache.
    """

    endpoint: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    offline: bool = False

    def __repr__(self) -> str:  # never show the token
        tok = "***" if self.token else None
        return f"HubOptions(endpoint={self.endpoint!r}, token={tok}, cache_dir={self.cache_dir!r}, offline={self.offline})"


@dataclass(frozen=True)
class RepoSpec:
    """``org/name`` plus an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None


def parse_repo_spec(text: str) -> RepoSpec | None:
    """``org/name@rev`` -> RepoSpec; None when ``text`` does not look like a repo id.

    Raises:
        ModelSourceError: the revision is empty or not a valid git ref name (``..``, ``/`` first...).
    """
    repo, _, rev = text.partition("@")
    if not _REPO_RE.match(repo):
        return None
    if "@" in text and not rev:
        raise ModelSourceError(f"{text!r}: empty revision after '@'")
    if rev:
        from optimizer.sources.names import check_revision

        check_revision(rev, where=repo)
    return RepoSpec(repo_id=repo, revision=rev or None)


def is_local(text: str) -> bool:
    """A value is local when it exists on disk or is written as a path."""
    return os.path.exists(text) or text.startswith(("/", "./", "../", "~")) or text in (".", "..")


def resolve_sources(*, specs: list[str], hub: HubOptions | None = None) -> list[Variant]:
    """Resolve every ``--model`` value to its variants, in order, without downloading weights.

    Raises:
        ModelSourceError: a value is neither an existing path nor a repo id.
        HubError and subclasses: the Hub could not answer (see ``optimizer.errors``).
    """
    variants: list[Variant] = []
    for spec in specs:
        if is_local(spec):
            from optimizer.sources.local import discover_local

            variants.extend(discover_local(Path(os.path.expanduser(spec))))
            continue
        rs = parse_repo_spec(spec)
        if rs is None:
            url = _HUB_URL_RE.match(spec)
            if url and _REPO_RE.match(url.group(1)):
                repo_id = url.group(1) + (f"@{url.group(2)}" if url.group(2) else "")
                raise ModelSourceError(f"{spec!r} is a web address: give the repo id instead, --model {repo_id}")
            raise ModelSourceError(
                f"{spec!r}: no such directory, and not a Hub repo id (expected org/name or org/name@revision)"
            )
        from optimizer.sources.hub import discover_hub

        variants.extend(discover_hub(spec=rs, options=hub or HubOptions()))
    seen: set[str] = set()
    unique = []
    for v in variants:
        if v.key not in seen:
            seen.add(v.key)
            unique.append(v)
    return unique
