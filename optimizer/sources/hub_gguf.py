"""GGUF variants of a Hugging Face Hub repo, from GGUF headers read with HTTP range requests.

A GGUF repo holds one ``.gguf`` file per quant (``Model-Q4_K_M.gguf``), possibly in sub-folders and
possibly as split sets (``Q8_0/Model-Q8_0-00001-of-00002.gguf``). Every quant becomes one variant.
Only the header of each file is read, through :func:`optimizer.formats.gguf.read_header` over ranged
GETs of the file's ``resolve`` URL (``optimizer.sources.http``: huggingface_hub's session, endpoint
and token, so errors map as for exl2). Requests start at 64 KiB and double up to 4 MiB, so a tiny
header costs one small request and a multi-MB tokenizer a handful; tensor data are never read.
Vision projectors (``mmproj*.gguf``) are not model variants and are skipped.

Results are plain JSON documents (``"format": "gguf"``) stored by ``optimizer.sources.hub`` in the
same metadata cache as exl2 snapshots; :func:`variant_from_doc` turns one back into a Variant.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from optimizer.errors import HubError, ModelSourceError
from optimizer.formats.gguf import GgufHeader, config_from_header, file_type_label, read_header
from optimizer.sources import http
from optimizer.sources.cache import tensors_from_rows
from optimizer.sources.gguf_local import group_files
from optimizer.variant import Location, Variant

_SPLIT_RE = re.compile(r"^(?P<stem>.+)-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)

#: ``errors()`` wraps a Hub call and maps its exceptions to exl2opt's typed errors.
ErrorScope = Callable[[], contextlib.AbstractContextManager[None]]


def gguf_paths(sizes: Mapping[str, int]) -> list[str]:
    """The ``.gguf`` paths of a revision's file list that are model variants (no ``mmproj``)."""
    return sorted(p for p in sizes if p.lower().endswith(".gguf") and not os.path.basename(p).lower().startswith("mmproj"))


def fetch_gguf_docs(
    *,
    repo_id: str,
    revision: str,
    sizes: Mapping[str, int],
    endpoint: str,
    token: str | None,
    errors: ErrorScope,
    pin: str | None = None,
) -> list[dict[str, Any]]:
    """Cacheable documents of every GGUF variant at one revision (``sizes``: path -> bytes; files
    are read at ``pin``, the revision's commit when known).

    Raises:
        ModelSourceError: a split set with missing parts.
        WeightsHeaderError: a header is not GGUF or is malformed.
        HubError and subclasses (through ``errors``): the Hub refused or failed.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    paths = gguf_paths(sizes)
    if not paths:
        return []
    headers = build_hf_headers(token=token or None, library_name="exl2opt")
    docs: list[dict[str, Any]] = []
    try:
        groups = group_files([Path(p) for p in paths])
    except ModelSourceError as e:
        raise ModelSourceError(f"{repo_id}@{revision}: {e}") from None
    for group in groups:
        rel = [p.as_posix() for p in group]
        parsed: list[GgufHeader] = []
        for path in rel:
            url = hf_hub_url(repo_id, path, revision=pin or revision, endpoint=endpoint)
            with errors():
                parsed.append(read_header(http.range_reader(url=url, headers=headers),
                                          name=f"{repo_id}@{revision}:{path}", chunk_bytes=http.FIRST_READ_BYTES))
        sub = os.path.dirname(rel[0])
        m = _SPLIT_RE.match(os.path.basename(rel[0]))
        stem = m.group("stem") if m else os.path.basename(rel[0])[: -len(".gguf")]
        docs.append({
            "format": "gguf",
            "subfolder": sub or None,
            "name": stem,
            "files": [os.path.basename(p) for p in rel],
            "file_sizes": {os.path.basename(p): int(sizes[p]) for p in rel},
            "config": config_from_header(parsed[0]),
            "tensors": [[t.name, t.type_name, list(t.shape), t.nbytes] for h in parsed for t in h.tensors],
        })
    return docs


def variant_from_doc(doc: Mapping[str, Any], *, repo_id: str, revision: str, commit: str | None) -> Variant:
    """A GGUF :class:`~optimizer.variant.Variant` from a document of :func:`fetch_gguf_docs`
    (fresh or from the cache); the same label and bits as local discovery of the same files."""
    where = f"{repo_id}@{revision}"
    config, rows, files, name = doc.get("config"), doc.get("tensors"), doc.get("files"), doc.get("name")
    sub = doc.get("subfolder")
    if not (isinstance(config, dict) and isinstance(config.get("gguf"), dict) and isinstance(rows, list)
            and isinstance(files, list) and files and isinstance(name, str)):
        raise HubError(f"{where}: cached metadata is corrupt; delete the exl2opt cache and retry")
    tensors = tensors_from_rows(rows, where=where)
    n_elem = 0
    for t in tensors:
        k = 1
        for d in t.shape:
            k *= d
        n_elem += k
    bits = 8 * sum(t.nbytes for t in tensors) / n_elem if n_elem else None
    return Variant(
        format="gguf",
        label=file_type_label(config["gguf"], name),
        location=Location(kind="hub", repo_id=repo_id, revision=revision, commit=commit,
                          subfolder=sub if isinstance(sub, str) and sub else None,
                          files=tuple(str(f) for f in files)),
        config=config,
        tensors=tensors,
        bits=round(bits, 3) if bits else None,
    )
