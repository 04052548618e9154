"""Plain, bounded HTTP reads of Hub files (config.json, safetensors and GGUF headers).

Every read is a GET with a ``Range`` header over huggingface_hub's HTTP session (so ``HF_ENDPOINT``,
proxies and the token's redirect handling are the Hub client's), and at most the asked number of
bytes is kept in memory whatever the server sends. Nothing here writes a file: server-chosen
values (``ETag``, ``X-Repo-Commit``, redirect targets) never become paths. HTTP errors are raised
as huggingface_hub's errors (``hf_raise_for_status``) for the caller's error mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from optimizer.errors import WeightsHeaderError

#: First ranged read of a header (bytes); later reads double up to :data:`MAX_READ_BYTES`.
FIRST_READ_BYTES = 64 * 2**10
MAX_READ_BYTES = 4 * 2**20


def read_range(url: str, *, headers: Mapping[str, str], start: int, length: int, timeout_s: float = 30.0,
               whole_file_ok: bool = False) -> bytes:
    """Up to ``length`` bytes of ``url`` from byte ``start`` (fewer only at the end of the file).

    A 416 answer is the end of the file (``b""``). A server that ignores ``Range`` (status 200) is
    refused unless ``whole_file_ok`` and ``start == 0`` (small files such as config.json): then at
    most ``length`` bytes of its body are read and the connection is closed.
    """
    from huggingface_hub.utils import get_session, hf_raise_for_status

    if length <= 0:
        return b""
    rng = f"bytes={start}-{start + length - 1}"
    with get_session().stream("GET", url, headers={**headers, "Range": rng}, timeout=timeout_s) as resp:
        if resp.status_code == 416:
            return b""
        if resp.status_code >= 400:
            resp.read()
            hf_raise_for_status(resp)
        if resp.status_code != 206 and not (resp.status_code == 200 and whole_file_ok and start == 0):
            raise WeightsHeaderError(f"{url.split('?')[0]}: the server ignores HTTP range requests "
                                     f"(status {resp.status_code}); refusing to download the whole file")
        data = bytearray()
        for chunk in resp.iter_bytes():
            data += chunk[: length - len(data)]
            if len(data) >= length:
                break
        return bytes(data)


def range_reader(*, url: str, headers: Mapping[str, str], timeout_s: float = 30.0) -> Callable[[int, int], bytes]:
    """A ``read(offset, length) -> bytes`` over :func:`read_range` that reads at least a growing
    chunk (:data:`FIRST_READ_BYTES` doubling to :data:`MAX_READ_BYTES`), so a small header costs one
    request and a multi-MB one a handful."""
    state = {"next": FIRST_READ_BYTES}

    def read(offset: int, length: int) -> bytes:
        want = max(length, state["next"])
        state["next"] = min(state["next"] * 2, MAX_READ_BYTES)
        return read_range(url, headers=headers, start=offset, length=want, timeout_s=timeout_s)

    return read
