"""Read a study the way optuna-dashboard serves it: its own storage opening and its WSGI API, no server."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults


def dashboard_get(app: Any, path: str, query: str = "") -> Any:
    """GET ``path`` from the optuna-dashboard WSGI ``app``; the decoded JSON body."""
    env: dict[str, Any] = {"PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(env)
    env["wsgi.input"] = io.BytesIO(b"")
    status: list[str] = []
    body = b"".join(app(env, lambda s, h, exc=None: status.append(s)))
    assert status and status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def served_study(journal: Path, name: str) -> dict[str, Any]:
    """The study detail optuna-dashboard serves for the journal file ``journal`` (as ``optuna-dashboard FILE`` opens it)."""
    from optuna_dashboard import wsgi
    from optuna_dashboard._storage_url import get_storage

    app = wsgi(get_storage(str(journal)))
    studies = dashboard_get(app, "/api/studies")["study_summaries"]
    sid = next(s["study_id"] for s in studies if s["study_name"] == name)
    return dict(dashboard_get(app, f"/api/studies/{sid}", "after=0"))


def check_served_values(detail: dict[str, Any], pareto_keys: set[str]) -> None:
    """The objective values the dashboard serves are the measured ones: every trial with values is a
    measured (or reused measured) configuration with exactly its perplexity, tokens/s and context;
    rejected configurations are PRUNED without values; its Pareto set is our front."""
    trials = detail["trials"]
    assert trials
    for t in trials:
        ua = t["user_attrs"]
        attrs = {a["key"]: a["value"] for a in ua}
        values = t.get("values")
        if attrs.get("status") in ("infeasible", "outside_space"):
            assert t["state"] == "Pruned" and not values, t  # (0.21 does not read Optuna 5's named constraints)
            continue
        if t["state"] != "Complete":
            continue
        assert attrs.get("status") in ("measured", "reused"), attrs
        got = [float(v) for v in values]
        want = [float(attrs["perplexity"]), float(attrs["gen_tok_s"]), float(attrs["max_seq_len"])]
        assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got, want, strict=True)), (got, want)
        assert got[0] < 1e3 and got[1] > 0 and got[2] > 0  # no placeholder number
    best = {next(a["value"] for a in t["user_attrs"] if a["key"] == "config_key") for t in detail["best_trials"]}
    assert best == pareto_keys
