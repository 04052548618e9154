"""``exl2opt worker``: join a study from any process or machine and measure until nothing is left.

Run one worker per GPU (``CUDA_VISIBLE_DEVICES=i exl2opt worker --study S --storage URL``); every
configuration is measured by exactly one worker (see :mod:`optimizer.study.worker_loop`). The first
worker (or ``exl2opt search``) needs the model options; later workers read them from the study.
The options are those of ``exl2opt search`` (one table, optimizer.cli._study_options).
"""

from __future__ import annotations

import sys

from optimizer.cli import app
from optimizer.cli._study_options import StudyArgs, WorkerArgs, study_command
from optimizer.errors import BadOptionError


@study_command(app, name="worker", own=WorkerArgs)
def worker(args: StudyArgs, own: WorkerArgs) -> None:
    """Join a study (create it with --model and --vram) and measure configurations until none is left."""
    from optimizer.cli._predict import resolve_gpus
    from optimizer.cli._study_options import backend_factory_for, carried, study_spec
    from optimizer.errors import RunInterrupted
    from optimizer.evaldata import load_eval_text
    from optimizer.study import WorkerOptions, ending, interrupted, run_worker
    from optimizer.study.commands import study_command as printed
    from optimizer.study.liveness import worker_id
    from optimizer.textsafe import safe

    args.check()
    if own.heartbeat < 1 or (own.grace is not None and own.grace <= own.heartbeat) or own.max_retry < 0 \
            or own.poll <= 0:
        raise BadOptionError("need --heartbeat >= 1, --grace > --heartbeat, --max-retry >= 0, --poll > 0")
    name = args.study_name()
    if name is None:
        raise BadOptionError("give --study NAME (the same on every worker), or --model and --vram to create a study")
    spec = study_spec(args, name=name)
    gpu_names = resolve_gpus(args.gpu)
    factory = backend_factory_for(args, spec)
    options = WorkerOptions(heartbeat_interval=own.heartbeat, grace_period=own.grace, max_retry=own.max_retry,
                            poll_s=own.poll)
    me = worker_id()
    resume = printed("worker", study=name, root=args.root, storage_url=args.storage, extra=carried(args))
    report_cmd = printed("report", study=name, root=args.root, storage_url=args.storage)

    def log(msg: str) -> None:
        print(safe(f"[{me}] {msg}"), file=sys.stderr, flush=True)

    try:
        res = run_worker(spec=spec, study_name=name, backend_factory=factory,
                         eval_text=lambda: load_eval_text(path=args.eval_data), storage_url=args.storage,
                         root=args.root, n_trials=args.n_trials, timeout=args.timeout, options=options, log=log,
                         exhaustive=args.exhaustive, gpus=gpu_names)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted(resume=resume)) from None
    skipped = "" if args.exhaustive else f", {res.n_skipped} skipped (dominated)"
    print(safe(f"worker {me}: measured {res.n_measured} configuration(s) here; study {name!r}: "
               f"{res.n_feasible} feasible, {res.study.measured} measured{skipped}, {res.n_failed} failed, "
               f"stop: {res.stop_reason}"))
    for line in ending(res, resume=resume, report=report_cmd):
        print(safe(line))
    print(safe(f"Report: {report_cmd}"))
