"""A loopback imitation of the Hugging Face Hub endpoints exl2opt calls (hub-conventions.md §3.3).

``FakeHub`` serves in-memory fixture repos on ``127.0.0.1:<free port>``:

* ``GET /api/models/{org}/{name}/refs``                       branches with targetCommit
* ``GET /api/models/{org}/{name}/tree/{rev}[/{path}]``        file list (recursive or one level)
* ``POST /api/models/{org}/{name}/paths-info/{rev}``          entries for the form's ``paths``
* ``GET /api/models/{org}/{name}[/revision/{rev}]``           model info with siblings
* ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}``          file bytes, ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``; ``Range: bytes=a-b`` gives 206 with whatever bytes exist
* errors: 404 + ``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``; a gated repo
  answers ``/resolve/`` with 401 (no token) or 403 (wrong token) + ``X-Error-Code: GatedRepo``.

Weight shards are *header-only* safetensors files (``write_header_only``) built from tiny configs
with ``optimizer.formats.exl2_synth``: the header bytes are real, the data is absent. The tree reports
the size the full file would have. Every request is recorded (method, path, Range, whether an
Authorization header was present -- never its value) so tests can prove no weight data was fetched;
``served`` adds the body bytes of every file GET. GGUF repos serve real (tiny) GGUF files, built with
``gguf_fake_files`` from files written by ``tests/gguf_util.write_tiny_gguf``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from optimizer.formats.exl2_synth import synthesize
from optimizer.safetensors_header import DTYPE_BYTES, write_header_only

#: A tiny Llama-shaped config (sizes divisible by 128 so exl2 groups are regular).
TINY_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def exl2_config(bits: float, head_bits: int, *, base: dict[str, Any] | None = None, with_qc: bool = True) -> dict[str, Any]:
    """``TINY_CONFIG`` (or ``base``) with an exl2 ``quantization_config`` block."""
    cfg = dict(base or TINY_CONFIG)
    if with_qc:
        cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.3.2", "bits": bits, "head_bits": head_bits,
                                      "calibration": {"rows": 115, "length": 2048, "dataset": "(default)"}}
    return cfg


def header_only_shard(tensors: dict[str, tuple[str, tuple[int, ...]]]) -> tuple[bytes, int]:
    """(header-only file bytes, size the full file would have) for a tensor table."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.safetensors"
        write_header_only(p, tensors)
        raw = p.read_bytes()
    data = sum(math.prod(s) * DTYPE_BYTES[dt] for dt, s in tensors.values())
    return raw, len(raw) + data


def exl2_files(bits: float, head_bits: int, *, shards: int = 1, with_qc: bool = True,
               base: dict[str, Any] | None = None) -> tuple[dict[str, FakeFile], int]:
    """Files of one exl2 variant (config.json + ``shards`` output shards) and its exact tensor bytes."""
    cfg = exl2_config(bits, head_bits, base=base, with_qc=with_qc)
    table = synthesize(cfg, bits=bits, head_bits=head_bits)
    names = list(table)
    per = math.ceil(len(names) / shards)
    files: dict[str, FakeFile] = {"config.json": FakeFile(json.dumps(cfg, indent=2).encode())}
    total = 0
    for i in range(shards):
        part = {k: table[k] for k in names[i * per:(i + 1) * per]}
        raw, size = header_only_shard(part)
        total += size - len(raw)
        name = "output.safetensors" if shards == 1 else f"output-{i + 1:05d}-of-{shards:05d}.safetensors"
        files[name] = FakeFile(raw, size=size)
    return files, total


@dataclass
class FakeFile:
    """Bytes served for a file; ``size`` is what the tree reports (defaults to ``len(data)``)."""

    data: bytes
    size: int | None = None

    @property
    def listed_size(self) -> int:
        return self.size if self.size is not None else len(self.data)


@dataclass
class FakeRepo:
    """A repo: ``branches`` maps a branch name to ``{path: FakeFile}``."""

    repo_id: str
    branches: dict[str, dict[str, FakeFile]]
    gated: bool = False
    token: str | None = None  #: the only token accepted for a gated repo
    tags: dict[str, str] = field(default_factory=dict)  #: tag name -> branch whose commit it points at

    def commit(self, branch: str) -> str:
        h = hashlib.sha1(self.repo_id.encode() + b"\0" + branch.encode())
        for path in sorted(self.branches[branch]):
            h.update(path.encode() + b"\0" + hashlib.sha1(self.branches[branch][path].data).digest())
        return h.hexdigest()

    def resolve(self, rev: str) -> str | None:
        """Branch name for a branch name or a commit sha; None if unknown."""
        if rev in self.branches:
            return rev
        if rev in self.tags:
            return self.tags[rev]
        for b in self.branches:
            if self.commit(b) == rev:
                return b
        return None


@dataclass(frozen=True)
class Req:
    """One recorded request (the Authorization value is never kept)."""

    method: str
    path: str
    range: str | None
    auth: bool


@dataclass
class FakeHub:
    """The server; use as a context manager or call ``start()``/``stop()``."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Req] = field(default_factory=list)
    served: list[tuple[str, int]] = field(default_factory=list)  #: (path, body bytes) of file GETs
    tree_page_size: int | None = None  #: when set, tree listings are paged with ``Link: <…>; rel="next"``
    #: hostile-Hub knobs: headers that replace the real ones on every ``/resolve/`` answer
    #: (``{"ETag": "../../x"}``), and ref commits as listed (``{branch: "../../x"}``)
    resolve_headers: dict[str, str] = field(default_factory=dict)
    listed_commits: dict[str, str] = field(default_factory=dict)
    #: flaky-Hub knob: the next this many GETs are answered 503 (then it serves again)
    unavailable: int = 0
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    def add(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def weight_gets(self) -> list[Req]:
        """Every GET of a ``.safetensors`` file."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(".safetensors")]

    def gguf_gets(self) -> list[Req]:
        """Every GET of a ``.gguf`` file."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(".gguf")]

    def bytes_served(self, suffix: str = ".gguf") -> dict[str, int]:
        """Body bytes sent per ``/resolve/`` path ending in ``suffix`` (GET answers only)."""
        out: dict[str, int] = {}
        for path, n in self.served:
            if path.endswith(suffix):
                out[path] = out.get(path, 0) + n
        return out


def gguf_fake_files(files: dict[str, Path]) -> dict[str, FakeFile]:
    """Repo files from local GGUF files (``{repo path: local file}``), served byte for byte."""
    return {name: FakeFile(Path(p).read_bytes()) for name, p in files.items()}


_API_RE = re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/(refs|tree|paths-info|revision)(?:/([^/]+)(?:/(.*))?)?)?/?$")
_RESOLVE_RE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        return

    # ----- helpers ---------------------------------------------------------------------------

    def _record(self) -> str:
        path = urlsplit(self.path).path
        self.fake.requests.append(Req(method=self.command, path=unquote(path), range=self.headers.get("Range"),
                                      auth=self.headers.get("Authorization") is not None))
        return path

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, doc: Any) -> None:
        self._send(200, json.dumps(doc).encode())

    def _error(self, status: int, code: str, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Code": code, "X-Error-Message": message})

    def _repo(self, org: str, name: str) -> FakeRepo | None:
        repo = self.fake.repos.get(f"{unquote(org)}/{unquote(name)}")
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        return repo

    def _branch(self, repo: FakeRepo, rev: str | None) -> str | None:
        b = repo.resolve(unquote(rev or "main"))
        if b is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return b

    @staticmethod
    def _entries(repo: FakeRepo, branch: str, prefix: str = "", recursive: bool = True) -> list[dict[str, Any]]:
        files = repo.branches[branch]
        out: list[dict[str, Any]] = []
        dirs: set[str] = set()
        pre = prefix.strip("/")
        for path in sorted(files):
            if pre and not path.startswith(pre + "/"):
                continue
            rel = path[len(pre) + 1:] if pre else path
            parts = rel.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(([pre] if pre else []) + parts[:i]))
            if not recursive and len(parts) > 1:
                continue
            f = files[path]
            e: dict[str, Any] = {"type": "file", "path": path, "size": f.listed_size,
                                 "oid": hashlib.sha1(f.data).hexdigest()}
            if path.endswith((".safetensors", ".gguf")):
                e["lfs"] = {"oid": hashlib.sha256(f.data).hexdigest(), "size": f.listed_size, "pointerSize": 134}
            out.append(e)
        for d in sorted(dirs):
            if recursive or "/" not in d[len(pre) + 1 if pre else 0:]:
                out.append({"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()})
        return out

    # ----- verbs -----------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802
        path = self._record()
        if self.fake.unavailable > 0:
            self.fake.unavailable -= 1
            return self._error(503, "ServiceUnavailable", "try again later")
        m = _API_RE.match(path)
        if m:
            return self._api(m)
        m = _RESOLVE_RE.match(path)
        if m:
            return self._resolve(m)
        self._error(404, "EntryNotFound", "no such endpoint")

    def do_HEAD(self) -> None:  # noqa: N802
        path = self._record()
        m = _RESOLVE_RE.match(path)
        if m:
            return self._resolve(m)
        self._error(404, "EntryNotFound", "no such endpoint")

    def do_POST(self) -> None:  # noqa: N802
        path = self._record()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        m = _API_RE.match(path)
        if not m or m.group(3) != "paths-info":
            return self._error(404, "EntryNotFound", "no such endpoint")
        repo = self._repo(m.group(1), m.group(2))
        if repo is None:
            return
        branch = self._branch(repo, m.group(4))
        if branch is None:
            return
        wanted = set(parse_qs(body).get("paths", []))
        self._json([e for e in self._entries(repo, branch) if e["path"] in wanted])

    def _api(self, m: re.Match[str]) -> None:
        repo = self._repo(m.group(1), m.group(2))
        if repo is None:
            return
        kind = m.group(3)
        if kind == "refs":
            return self._json({
                "branches": [{"name": b, "ref": f"refs/heads/{b}",
                              "targetCommit": self.fake.listed_commits.get(b, repo.commit(b))} for b in repo.branches],
                "converts": [],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": repo.commit(b)} for t, b in repo.tags.items()],
            })
        if kind == "tree":
            branch = self._branch(repo, m.group(4))
            if branch is None:
                return
            q = parse_qs(urlsplit(self.path).query)
            recursive = q.get("recursive", ["false"])[0].lower() == "true"
            entries = self._entries(repo, branch, unquote(m.group(5) or ""), recursive)
            size = self.fake.tree_page_size
            if not size:
                return self._json(entries)
            start = int(q.get("cursor", ["0"])[0])
            page = entries[start:start + size]
            headers: dict[str, str] = {}
            if start + size < len(entries):
                query = f"recursive={str(recursive).lower()}&expand=false&cursor={start + size}"
                nxt = f"{self.fake.endpoint}{urlsplit(self.path).path}?{query}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            return self._send(200, json.dumps(page).encode(), headers)
        branch = self._branch(repo, m.group(4) if kind == "revision" else None)
        if branch is None:
            return
        files = repo.branches[branch]
        self._json({
            "id": repo.repo_id, "sha": repo.commit(branch), "gated": "manual" if repo.gated else False, "private": False,
            "siblings": [{"rfilename": p, "size": f.listed_size, "blobId": hashlib.sha1(f.data).hexdigest()}
                         for p, f in sorted(files.items())],
        })

    def _resolve(self, m: re.Match[str]) -> None:
        repo = self._repo(m.group(1), m.group(2))
        if repo is None:
            return
        branch = self._branch(repo, m.group(3))
        if branch is None:
            return
        if repo.gated:
            auth = self.headers.get("Authorization")
            if auth is None:
                return self._error(401, "GatedRepo", "Access to this model is restricted. You must be authenticated.")
            if auth != f"Bearer {repo.token}":
                return self._error(403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list.")
        f = repo.branches[branch].get(unquote(m.group(4)))
        if f is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        data = f.data
        etag = '"' + hashlib.sha1(data).hexdigest() + '"'
        headers = {"X-Repo-Commit": repo.commit(branch), "ETag": etag, "Accept-Ranges": "bytes",
                   **self.fake.resolve_headers}
        rng = self.headers.get("Range")
        mr = re.match(r"^bytes=(\d+)-(\d*)$", rng or "")
        if mr and self.command == "GET":
            start = int(mr.group(1))
            end = int(mr.group(2)) if mr.group(2) else len(data) - 1
            chunk = data[start:end + 1]
            if not chunk:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
            headers["Content-Length"] = str(len(chunk))
            self.fake.served.append((unquote(urlsplit(self.path).path), len(chunk)))
            return self._send(206, chunk, headers, ctype="application/octet-stream")
        headers["Content-Length"] = str(len(data))
        if self.command == "GET":
            self.fake.served.append((unquote(urlsplit(self.path).path), len(data)))
        self._send(200, data, headers, ctype="application/octet-stream")
