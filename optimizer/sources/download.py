"""Fetch a Hub variant's files for measurement (the only place exl2opt downloads weights).

Discovery never downloads weights; a ``search`` trial that must load a Hub variant calls
:func:`local_path`, which downloads exactly that variant at its recorded commit and returns a local
path the engine can open. Local variants are returned as they are.

The files are listed (the Hub's tree API, paged) and fetched with plain GETs through huggingface_hub's
HTTP session into exl2opt's own directory ``<cache>/weights/<hash>/`` (``<hash>``: SHA-256 of endpoint, repo and
commit), under their repo paths after :func:`~optimizer.sources.names.path_problem` accepted them.
Server-chosen values (``ETag``, ``X-Repo-Commit``) never become paths, unlike huggingface_hub's own
cache. Each file is written to a temporary name and renamed when its size matches the listing;
a file already present with the listed size is kept (a rerun resumes). ``HF_ENDPOINT`` and
``HF_TOKEN`` are read as huggingface_hub reads them; the token is never shown.

A transient failure (connection refused or reset, timeout, HTTP 408/429/5xx) is retried by
:class:`RetryPolicy` (bounded, with back-off); if it persists the configuration fails with
:class:`~optimizer.errors.EngineTransientError`, which the study measures again in its next run
instead of recording it as final.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from optimizer.errors import EngineError, EngineTransientError, Exl2optError
from optimizer.formats import LEFTOVERS, format_spec
from optimizer.sources.names import is_commit, path_problem, revision_problem
from optimizer.textsafe import safe
from optimizer.variant import Variant

#: Converter leftovers that a model load never reads.
_SKIP = LEFTOVERS
_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of transient download failures: ``attempts`` in all, waiting ``first_delay_s``
    seconds after the first failure and twice as long after each further one (at most ``max_delay_s``)."""

    attempts: int = 4
    first_delay_s: float = 2.0
    max_delay_s: float = 30.0

    def delays(self) -> list[float]:
        """The waits between attempts, in seconds."""
        return [min(self.first_delay_s * 2**i, self.max_delay_s) for i in range(max(self.attempts - 1, 0))]


DEFAULT_RETRY = RetryPolicy()
#: HTTP statuses worth another attempt (timeouts, rate limits, server errors).
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Transport exception classes (httpx and friends, matched by name) worth another attempt.
_TRANSIENT_NAMES = frozenset({"TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError",
                              "ProtocolError", "ConnectionError", "Timeout"})


def local_path(variant: Variant, *, retry: RetryPolicy = DEFAULT_RETRY) -> str:
    """A local directory (exl2) or first file (GGUF) holding ``variant``, downloading it if needed.

    Raises:
        EngineTransientError: the Hub could not be reached after ``retry.attempts`` attempts.
        EngineError: the download failed for good or a name is unsafe (one line; the token is never shown).
    """
    loc = variant.location
    if loc.kind == "local":
        if not loc.path:
            raise EngineError(f"{safe(variant.source)}: no local path")
        return loc.path
    delays = retry.delays()
    for attempt in range(1, len(delays) + 2):
        try:
            return _download(variant)
        except EngineError:
            raise
        except Exception as e:  # any Hub/transport/disk failure fails this configuration only
            what = safe(e) if isinstance(e, Exl2optError) else type(e).__name__
            if not is_transient(e):
                raise EngineError(f"{safe(variant.source)}: cannot download ({what})") from None
            if attempt > len(delays):
                raise EngineTransientError(f"{safe(variant.source)}: cannot download ({what}) after {attempt} "
                                           "attempts; it is tried again when the search resumes") from None
            time.sleep(delays[attempt - 1])
    raise AssertionError("unreachable")  # pragma: no cover


def is_transient(e: BaseException) -> bool:
    """Whether a failed download is worth another attempt: a transport error or an HTTP 408/429/5xx."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status in _TRANSIENT_STATUS
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    return any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__)


def _pin(variant: Variant) -> str:
    loc = variant.location
    if is_commit(loc.commit):
        return str(loc.commit)
    rev = loc.revision or "main"
    why = revision_problem(rev)
    if why is not None:
        raise EngineError(f"{safe(variant.source)}: refusing to download: revision {safe(repr(rev))} {why}")
    return rev


def weights_dir(*, endpoint: str, repo_id: str, pin: str) -> Path:
    """exl2opt's download directory of one repo at one commit (a hash, never a server-chosen name)."""
    from optimizer.sources.cache import default_cache_dir

    key = hashlib.sha256(f"{endpoint}\0{repo_id}\0{pin}".encode()).hexdigest()[:40]
    return default_cache_dir() / "weights" / key


def _download(variant: Variant) -> str:
    from huggingface_hub.utils import build_hf_headers, disable_progress_bars

    from optimizer.sources.hub_files import file_url

    disable_progress_bars()
    loc = variant.location
    repo = loc.repo_id or ""
    pin = _pin(variant)
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None
    sub = loc.subfolder or ""
    if sub and path_problem(sub):
        raise EngineError(f"{safe(variant.source)}: refusing to download: unsafe sub-folder {safe(repr(sub))}")
    headers = build_hf_headers(token=token, library_name="exl2opt")
    listed = _list_files(endpoint=endpoint, repo_id=repo, pin=pin, headers=headers)
    if format_spec(variant.format).layout == "files":
        wanted = [f"{sub}/{f}" if sub else f for f in loc.files]
        missing = [w for w in wanted if w not in listed]
        if not wanted or missing:
            raise EngineError(f"{safe(variant.source)}: GGUF file(s) not in the repo: {safe(', '.join(missing))}")
    else:
        wanted = sorted(p for p in listed if (not sub or p.startswith(sub + "/")) and os.path.basename(p) not in _SKIP)
    root = weights_dir(endpoint=endpoint, repo_id=repo, pin=pin)
    for path in wanted:
        why = path_problem(path)
        if why is not None:
            raise EngineError(f"{safe(variant.source)}: refusing to download {safe(repr(path))}: it {why}")
        _fetch(url=file_url(endpoint=endpoint, repo_id=repo, path=path, revision=pin), headers=headers,
               dest=root / path, size=listed[path])
    if format_spec(variant.format).layout == "files":
        return str(root / wanted[0])
    return str(root / sub) if sub else str(root)


def _list_files(*, endpoint: str, repo_id: str, pin: str, headers: dict[str, str]) -> dict[str, int]:
    """Every file of the repo at ``pin``: path -> size in bytes (the tree API, following ``Link: rel=next``).

    One GET per page and no retries of its own (:func:`local_path` retries the whole download)."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    url: str | None = f"{endpoint}/api/models/{repo_id}/tree/{quote(pin, safe='')}"
    params: dict[str, str] | None = {"recursive": "true", "expand": "false"}
    out: dict[str, int] = {}
    for _ in range(100000):  # pages; a server that pages forever is cut off
        if url is None:
            return out
        resp = get_session().get(url, params=params, headers=headers, timeout=60)
        hf_raise_for_status(resp)
        for entry in resp.json():
            if isinstance(entry, dict) and entry.get("type") == "file":
                out[str(entry["path"])] = int(entry["size"])
        url, params = resp.links.get("next", {}).get("url"), None
    raise EngineError(f"{safe(repo_id)}: the file listing does not end")


def _fetch(*, url: str, headers: dict[str, str], dest: Path, size: int) -> None:
    """Stream ``url`` into ``dest`` (a temporary name first); the body must be exactly ``size`` bytes."""
    from huggingface_hub.utils import get_session, hf_raise_for_status

    if dest.is_file() and dest.stat().st_size == size:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        got = 0
        with os.fdopen(fd, "wb") as out, get_session().stream("GET", url, headers=headers, timeout=60) as resp:
            if resp.status_code >= 400:
                resp.read()
                hf_raise_for_status(resp)
            for chunk in resp.iter_bytes(_CHUNK):
                got += len(chunk)
                if got > size:
                    raise EngineError(f"{dest.name}: the server sent more than the listed {size} bytes")
                out.write(chunk)
        if got != size:
            raise EngineError(f"{dest.name}: got {got} of {size} bytes")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
