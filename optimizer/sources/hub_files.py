"""config.json and safetensors headers of Hub files, read with plain ranged GETs (never weight data).

Both readers go through :mod:`optimizer.sources.http` (bounded reads, nothing written to disk) and
then through exl2opt's own validators, so a Hub file gets exactly the checks a local file gets:
``load_config_bytes`` for config.json and ``parse_header_json`` (caps before parsing, dtype, shape,
offsets) for a safetensors header. The caller caches the parsed result in
:class:`~optimizer.sources.cache.MetaCache`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optimizer.errors import ModelConfigError, WeightsHeaderError
from optimizer.safetensors_header import header_length, parse_header_json
from optimizer.sources import http
from optimizer.sources.local import MAX_CONFIG_BYTES, load_config_bytes
from optimizer.variant import TensorInfo


def file_url(*, endpoint: str, repo_id: str, path: str, revision: str) -> str:
    """The ``resolve`` URL of one file (revision and path percent-encoded by huggingface_hub)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id, path, revision=revision, endpoint=endpoint)


def read_config(*, url: str, headers: Mapping[str, str], where: str) -> dict[str, Any]:
    """config.json at ``url``: at most :data:`MAX_CONFIG_BYTES` + 1 bytes are read, then validated.

    Raises:
        ModelConfigError: larger than the cap, not JSON, not an object (one line naming ``where``).
    """
    raw = http.read_range(url, headers=headers, start=0, length=MAX_CONFIG_BYTES + 1, whole_file_ok=True)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ModelConfigError(f"{where}: config.json is larger than {MAX_CONFIG_BYTES // 2**20} MiB")
    return load_config_bytes(raw, name=where)


def read_safetensors_header(*, url: str, headers: Mapping[str, str], name: str,
                            file_size: int | None = None) -> tuple[TensorInfo, ...]:
    """The tensors of a safetensors file on the Hub, from its header alone.

    The 8-byte length is read first (with the first 64 KiB, enough for most exl2 shards); a longer
    header is fetched in one more ranged read of exactly its length, bounded by the header cap.

    Raises:
        WeightsHeaderError: length not plausible, truncated, or the header fails validation.
    """
    first = http.read_range(url, headers=headers, start=0, length=http.FIRST_READ_BYTES)
    n = header_length(first, name=name, file_size=file_size)
    raw = first[8:8 + n]
    if len(raw) < n:
        raw += http.read_range(url, headers=headers, start=8 + len(raw), length=n - len(raw))
    if len(raw) != n:
        raise WeightsHeaderError(f"{name}: safetensors header is truncated")
    data_size = file_size - 8 - n if file_size is not None else None
    return parse_header_json(raw, name=name, data_size=data_size)
