"""Variants from the Hugging Face Hub, from metadata only (never weight data).

For a repo it lists the refs (one branch per bpw is the common layout; the set is never assumed),
lists each revision's files, and for every directory that holds ``config.json`` and weight shards of
a folder format of the registry (``optimizer.formats.FORMATS``: exl2 ``output*.safetensors``, EXL3
``model*.safetensors``; the config's ``quantization_config.quant_method`` says which; converter
leftovers and stale index files are ignored) downloads config.json (a few kB) and reads each shard's
safetensors header with HTTP range requests. ``org/name@rev`` looks at that revision only. Sub-folder layouts (``3.0bpw/config.json``)
give one variant per folder. ``.gguf`` files at any revision are GGUF variants, one per quant file or
split set, read from their headers only (``optimizer.sources.hub_gguf``).

Everything read is stored in :class:`~optimizer.sources.cache.MetaCache`; a repeated run reuses it
per commit sha, and ``offline=True`` or an unreachable Hub falls back to it. The token (``HF_TOKEN``)
is only handed to huggingface_hub; it is never printed, logged or stored.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from optimizer.arch import quant_bits
from optimizer.errors import (
    Exl2optError,
    GatedRepoError,
    HubError,
    ModelConfigError,
    ModelSourceError,
    OfflineError,
    RepoNotFoundError,
    RevisionNotFoundError,
    WeightsHeaderError,
)
from optimizer.formats import FORMATS, folder_format, legacy_format
from optimizer.sources import HubOptions, RepoSpec
from optimizer.sources.cache import MetaCache, default_cache_dir, tensors_from_rows
from optimizer.sources.local import MAX_CONFIG_BYTES, bits_from_name, variant_label
from optimizer.sources.names import is_commit, revision_problem, safe_repo_paths
from optimizer.textsafe import safe
from optimizer.variant import Location, TensorInfo, Variant

if TYPE_CHECKING:
    from huggingface_hub import HfApi

_log = logging.getLogger("exl2opt")
_TRANSPORT_MODULES = ("httpx", "httpcore", "httpx2", "requests", "urllib3", "h11", "h2", "anyio", "ssl", "socket")


@dataclass(frozen=True)
class HubDiscovery:
    """Result of :func:`discover_hub_detailed`: the variants and where their metadata came from."""

    variants: tuple[Variant, ...]
    from_cache: bool  #: True when refs/metadata were read from the cache instead of the Hub
    reason: str = ""  #: why the cache was used ("offline", "network"), empty when online
    skipped: tuple[str, ...] = ()  #: one line per branch left out because its files are malformed


def discover_hub(*, spec: RepoSpec, options: HubOptions) -> list[Variant]:
    """Every exl2 variant of ``spec`` (all branches, or just ``spec.revision``), without weight data.

    Raises:
        RepoNotFoundError, RevisionNotFoundError: the repo or revision does not exist (usage, exit 2).
        GatedRepoError: the repo is gated and no accepted token was given.
        OfflineError: offline (or the Hub unreachable) and nothing cached for this repo.
        HubError: any other Hub failure. ModelSourceError: no exl2 variant in the repo/revision.
        ModelConfigError / WeightsHeaderError: config.json or a shard header is malformed.
    """
    return list(discover_hub_detailed(spec=spec, options=options).variants)


def discover_hub_detailed(*, spec: RepoSpec, options: HubOptions) -> HubDiscovery:
    """As :func:`discover_hub`, also saying whether the metadata came from the cache."""
    cache = MetaCache(root=Path(options.cache_dir).expanduser() if options.cache_dir else default_cache_dir())
    where = spec.repo_id + (f"@{spec.revision}" if spec.revision else "")
    if options.offline:
        cached = _from_cache(spec=spec, cache=cache)
        if cached is None:
            raise OfflineError(
                f"{where}: offline (--offline or HF_HUB_OFFLINE) and no metadata for it is cached in "
                f"{cache.root}; run once with network access first"
            )
        return HubDiscovery(variants=cached, from_cache=True, reason="offline")
    skipped: list[str] = []
    try:
        variants = _from_hub(spec=spec, options=options, cache=cache, skipped=skipped)
    except OfflineError as e:
        cached = _from_cache(spec=spec, cache=cache)
        if cached is None:
            raise OfflineError(f"{e}; nothing is cached for {where} yet (one online run fills the cache)") from None
        return HubDiscovery(variants=cached, from_cache=True, reason="network")
    return HubDiscovery(variants=variants, from_cache=False, skipped=tuple(skipped))


# ----- online ------------------------------------------------------------------------------------


def _host(options: HubOptions) -> str:
    """The endpoint's host[:port] for messages (never its user or password)."""
    ep = options.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        u = urlparse(ep)
        host = u.hostname or ""
        return safe(host + (f":{u.port}" if u.port else "")) if host else "the Hub endpoint"
    except ValueError:  # a malformed port
        return "the Hub endpoint"


@contextlib.contextmanager
def _hub_errors(*, repo_id: str, revision: str | None, options: HubOptions) -> Iterator[None]:
    """Map huggingface_hub and transport exceptions to exl2opt's typed errors (token never shown)."""
    from huggingface_hub import errors as he

    where = repo_id + (f"@{revision}" if revision else "")
    try:
        yield
    except Exl2optError:
        raise
    except he.GatedRepoError:
        if options.token:
            raise GatedRepoError(
                f"{repo_id} is gated and the token in HF_TOKEN was refused: accept its terms on the Hub with that account"
            ) from None
        raise GatedRepoError(f"{repo_id} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except he.RepositoryNotFoundError:
        hint = "" if options.token else " (if it is private, set HF_TOKEN)"
        raise RepoNotFoundError(f"{repo_id}: repository not found on {_host(options)}{hint}") from None
    except he.RevisionNotFoundError:
        raise RevisionNotFoundError(f"{repo_id}: revision {revision!r} not found (list branches on the Hub)") from None
    except he.OfflineModeIsEnabled:
        raise OfflineError(f"{where}: huggingface_hub is in offline mode (HF_HUB_OFFLINE)") from None
    except he.LocalEntryNotFoundError:  # hf_hub_download wraps connection failures in this
        raise OfflineError(f"{where}: cannot reach {_host(options)}") from None
    except he.RemoteEntryNotFoundError:
        raise HubError(f"{where}: a file listed by the Hub could not be fetched (404)") from None
    except he.SafetensorsParsingError:
        raise WeightsHeaderError(f"{where}: a safetensors header could not be parsed") from None
    except he.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise GatedRepoError(
                f"{repo_id}: access denied (HTTP {status}); accept its terms on the Hub and set HF_TOKEN "
                "to a token allowed to read it"
            ) from None
        raise HubError(f"{where}: the Hub at {_host(options)} answered HTTP {status}") from None
    except Exception as e:
        mod = type(e).__module__.split(".")[0]
        if isinstance(e, (ConnectionError, TimeoutError)) or mod in _TRANSPORT_MODULES:
            raise OfflineError(f"{where}: cannot reach {_host(options)} ({type(e).__name__})") from None
        if isinstance(e, OSError):  # e.g. the metadata cache directory is not writable
            raise HubError(f"{where}: {type(e).__name__}: {e.strerror or e}") from None
        raise


def _api(options: HubOptions) -> HfApi:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # a progress bar on stderr would break one-line errors
    return HfApi(endpoint=options.endpoint or None, token=options.token or None, library_name="exl2opt")


def _from_hub(*, spec: RepoSpec, options: HubOptions, cache: MetaCache, skipped: list[str]) -> tuple[Variant, ...]:
    """Variants read from the Hub (cached snapshots reused per commit).

    When listing every branch, a branch whose config.json or shard headers are malformed is left
    out, logged once as a warning (logger ``exl2opt``) and described in ``skipped``; if no branch is
    usable, the first such error is raised. A revision asked for by name raises its error.
    """
    repo = spec.repo_id
    api = _api(options)
    with _hub_errors(repo_id=repo, revision=None, options=options):
        git_refs = api.list_repo_refs(repo)
    refs = _checked_refs(repo, [("branch", b.name, b.target_commit) for b in git_refs.branches]
                         + [("tag", t.name, t.target_commit) for t in git_refs.tags], skipped=skipped)
    cache.save_refs(repo, refs)
    if spec.revision is not None:
        known = {r["name"]: r["commit"] for r in refs}
        commit = known.get(spec.revision)
        if commit is None and is_commit(spec.revision):
            commit = spec.revision
        todo = [(spec.revision, commit)]
    else:
        todo = [(str(r["name"]), r["commit"]) for r in refs if r["kind"] == "branch"]
    variants: list[Variant] = []
    first_error: ModelConfigError | None = None
    n_bad = 0
    for rev, commit in todo:
        cached = cache.load_snapshot_by_commit(repo, commit)
        found = _variants_or_none(cached, repo_id=repo, revision=rev, commit=commit) if cached is not None else None
        if found is None:  # not cached, or cached by an older exl2opt in another schema: fetch again
            try:
                docs = _fetch_revision(api=api, repo_id=repo, revision=rev, commit=commit, options=options,
                                       skipped=skipped)
                found = [_variant_from_doc(d, repo_id=repo, revision=rev, commit=commit) for d in docs]
            except ModelConfigError as e:
                if spec.revision is not None:
                    raise
                first_error = first_error or e
                n_bad += 1
                skipped.append(str(e))
                continue
            cache.save_snapshot(repo, revision=rev, commit=commit, variants=docs)
        else:
            cache.save_snapshot(repo, revision=rev, commit=commit, variants=cached or [])
        variants.extend(found)
    if not variants and first_error is not None:  # one line: the error, not a warning per branch first
        more = f" (and {n_bad - 1} more malformed branch(es))" if n_bad > 1 else ""
        raise type(first_error)(f"{first_error}{more}") from None
    for note in skipped:  # only when something usable was found: the run goes on without these
        _log.warning("exl2opt: warning: %s", safe(note if "ignored" in note else f"skipping {note}"))
    return _finish(variants, spec=spec)


def _checked_refs(repo: str, listed: Sequence[tuple[str, object, object]], *,
                  skipped: list[str]) -> list[dict[str, str | None]]:
    """Refs as cacheable dicts. A name that is not a valid git ref (or holds ``..``) is left out
    with one warning; a commit that is not 40 hex digits is dropped (the name is used instead)."""
    refs: list[dict[str, str | None]] = []
    for kind, name, commit in listed:
        why = revision_problem(name) if isinstance(name, str) else "it is not a string"
        if why is not None:
            note = f"{repo}: {kind} {safe(repr(name))[:120]} ignored: {why}"
            skipped.append(note)
            continue
        refs.append({"name": str(name), "kind": kind, "commit": str(commit) if is_commit(commit) else None})
    return refs


def _variants_or_none(docs: list[dict[str, Any]], *, repo_id: str, revision: str, commit: str | None) -> list[Variant] | None:
    """Variants of cached documents, or None when any document is unusable (old schema, damage)."""
    try:
        return [_variant_from_doc(d, repo_id=repo_id, revision=revision, commit=commit) for d in docs]
    except (HubError, ModelConfigError):
        return None


def _fetch_revision(*, api: HfApi, repo_id: str, revision: str, commit: str | None, options: HubOptions,
                    skipped: list[str]) -> list[dict[str, Any]]:
    """Metadata of every exl2 variant at one revision, as cacheable JSON documents.

    Files are listed with huggingface_hub (``list_repo_tree``) at the commit when it is known; a
    listed path that could escape its folder (``..``, absolute, control characters) is left out and
    noted in ``skipped``. config.json and shard headers are read with plain ranged GETs
    (``optimizer.sources.hub_files``); nothing is written outside exl2opt's own metadata cache.
    """
    from huggingface_hub import RepoFile
    from huggingface_hub.utils import build_hf_headers

    from optimizer.sources.hub_files import file_url, read_config, read_safetensors_header

    pin = str(commit) if is_commit(commit) else revision
    with _hub_errors(repo_id=repo_id, revision=revision, options=options):
        entries = list(api.list_repo_tree(repo_id, revision=pin, recursive=True))
    listed = {e.path: int(e.size) for e in entries if isinstance(e, RepoFile)}
    good, bad = safe_repo_paths(list(listed))
    if bad:
        note = f"{repo_id}@{revision}: {len(bad)} file(s) with unsafe names ignored, e.g. {safe(repr(bad[0]))}"
        skipped.append(note)
    sizes = {p: listed[p] for p in good}
    headers = build_hf_headers(token=options.token or None, library_name="exl2opt")
    dirs = sorted({os.path.dirname(p) for p in sizes if os.path.basename(p) == "config.json"})
    folder_formats = [f for f in FORMATS.values() if f.layout == "folder"]
    docs: list[dict[str, Any]] = []
    for d in dirs:
        in_dir = [p for p in sizes if os.path.dirname(p) == d]
        if not any(f.is_shard(os.path.basename(p)) for f in folder_formats for p in in_dir):
            continue  # e.g. main with README + measurement.json, or a folder without weights
        where = f"{repo_id}@{revision}" + (f"/{d}" if d else "")
        cfg_path = f"{d}/config.json" if d else "config.json"
        if sizes.get(cfg_path, 0) > MAX_CONFIG_BYTES:
            raise ModelConfigError(f"{where}: config.json is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
        with _hub_errors(repo_id=repo_id, revision=revision, options=options):
            config = read_config(url=file_url(endpoint=api.endpoint, repo_id=repo_id, path=cfg_path, revision=pin),
                                 headers=headers, where=where)
        fmt = folder_format(config)
        shards = sorted(p for p in in_dir if fmt.is_shard(os.path.basename(p)))
        if not shards:
            continue  # e.g. the FP16 original's model-*.safetensors next to an exl2 config: not this format
        by_name: dict[str, TensorInfo] = {}
        for shard in shards:
            name = f"{repo_id}@{revision}:{shard}"
            with _hub_errors(repo_id=repo_id, revision=revision, options=options):
                found = read_safetensors_header(
                    url=file_url(endpoint=api.endpoint, repo_id=repo_id, path=shard, revision=pin),
                    headers=headers, name=name, file_size=sizes[shard])
            for t in found:  # as ExLlamaV2 (and local discovery): the last shard holding a key wins
                by_name.pop(t.name, None)
                by_name[t.name] = t
        tensors = [[t.name, t.dtype, list(t.shape), t.nbytes] for t in by_name.values()]
        docs.append({
            "format": fmt.name,
            "subfolder": d or None,
            "files": [os.path.basename(s) for s in shards],
            "file_sizes": {os.path.basename(s): sizes[s] for s in shards},
            "config": config,
            "tensors": tensors,
        })
    from optimizer.sources.hub_gguf import fetch_gguf_docs

    docs += fetch_gguf_docs(
        repo_id=repo_id, revision=revision, sizes=sizes, endpoint=api.endpoint, token=options.token,
        errors=lambda: _hub_errors(repo_id=repo_id, revision=revision, options=options), pin=pin,
    )
    return docs


# ----- cache -------------------------------------------------------------------------------------


def _from_cache(*, spec: RepoSpec, cache: MetaCache) -> tuple[Variant, ...] | None:
    """Variants from the metadata cache alone, or None when this repo/revision was never cached."""
    repo = spec.repo_id
    if spec.revision is not None:
        hit = cache.load_snapshot_by_revision(repo, spec.revision)
        if hit is None:
            docs = cache.load_snapshot_by_commit(repo, spec.revision)
            if docs is None:
                return None
            hit = (spec.revision, docs)
        commit, docs = hit
        return _finish([_variant_from_doc(d, repo_id=repo, revision=spec.revision, commit=commit) for d in docs], spec=spec)
    refs = cache.load_refs(repo)
    if refs is None:
        return None
    variants: list[Variant] = []
    for r in refs:
        if r["kind"] != "branch":
            continue
        rev = str(r["name"])
        docs = cache.load_snapshot_by_commit(repo, r["commit"])
        commit = r["commit"]
        if docs is None:
            hit = cache.load_snapshot_by_revision(repo, rev)
            if hit is None:
                continue
            commit, docs = hit
        variants.extend(_variant_from_doc(d, repo_id=repo, revision=rev, commit=commit) for d in docs)
    return _finish(variants, spec=spec)


# ----- documents -> variants -------------------------------------------------------------------


def _variant_from_doc(doc: dict[str, Any], *, repo_id: str, revision: str, commit: str | None) -> Variant:
    where = f"{repo_id}@{revision}"
    fmt = FORMATS.get(str(doc.get("format", legacy_format().name)))  # documents cached before EXL3 name none
    if fmt is None:
        raise HubError(f"{where}: cached metadata is corrupt; delete the exl2opt cache and retry")
    if fmt.layout == "files":
        from optimizer.sources.hub_gguf import variant_from_doc

        return variant_from_doc(doc, repo_id=repo_id, revision=revision, commit=commit)
    config = doc.get("config")
    rows = doc.get("tensors")
    files = doc.get("files")
    sub = doc.get("subfolder")
    if not isinstance(config, dict) or not isinstance(rows, list) or not isinstance(files, list):
        raise HubError(f"{where}: cached metadata is corrupt; delete the exl2opt cache and retry")
    tensors = tensors_from_rows(rows, where=where)
    sub = sub if isinstance(sub, str) and sub else None
    # name hints: sub-folder, else the branch (unless main), else the repo name
    hint = sub or (revision if revision != "main" and not is_commit(revision) else repo_id.split("/")[-1])
    bits, head_bits = quant_bits(config)
    if bits is None:
        bits, hb_name = bits_from_name(hint)
        head_bits = head_bits if head_bits is not None else hb_name
    label = variant_label(config, hint)
    return Variant(
        format=fmt.name,
        label=label,
        location=Location(kind="hub", repo_id=repo_id, revision=revision, commit=commit, subfolder=sub,
                          files=tuple(str(f) for f in files)),
        config=config,
        tensors=tensors,
        bits=bits,
        head_bits=head_bits,
    )


def _finish(variants: list[Variant], *, spec: RepoSpec) -> tuple[Variant, ...]:
    if not variants:
        where = spec.repo_id + (f"@{spec.revision}" if spec.revision else " (any branch)")
        raise ModelSourceError(
            f"{where}: no {', '.join(FORMATS)} variant found (config.json with output*.safetensors or "
            "model*.safetensors, or *.gguf files)"
        )
    return tuple(sorted(variants, key=lambda v: (v.bits if v.bits is not None else 99.0, v.label, v.source)))
