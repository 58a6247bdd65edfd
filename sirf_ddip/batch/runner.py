"""Run a batch on Dask: skip complete tasks, submit the others when their dependencies are done, resubmit a task
whose worker died (a bounded number of times), report every state change, and write the summary.

A task is submitted once the tasks it depends on are done or skipped; when one of them failed it fails too
("not run: ..."), except ``report``, which runs once its study's other tasks have finished, whatever their
outcome. A task's own errors come back as its result (:func:`.execute.run_task` never raises); an exception of
its future means that its worker died (killed, out of memory) or the cluster lost it: the task is resubmitted
(it resumes from its DDIP checkpoint) up to ``retries`` times, then failed with the reason.

Progress (stderr): one line per state change of a task (``queued``, ``running``, ``done``, ``skipped``,
``failed``, ``retrying``) and a summary line (done / running / failed / left, ETA) after each change and
every :data:`HEARTBEAT_S` seconds.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .manifest import Manifest
from .plan import Task, is_complete, plan_tasks, read_done

__all__ = ["JobRecord", "run_batch", "HEARTBEAT_S", "summary_line"]

#: seconds between summary lines while nothing changes
HEARTBEAT_S = 60.0
#: seconds between polls of the scheduler (which tasks are running)
POLL_S = 0.5


@dataclass
class JobRecord:
    """What became of one task (a row of ``batch.json``)."""

    task: Task
    status: str = "pending"        # pending, queued, running, done, skipped, failed
    message: str = ""
    seconds: float | None = None   # the task's own time on its worker
    wall_seconds: float | None = None  # from submission to its result, as the client saw it
    attempts: int = 0
    metrics: dict | None = None
    worker: str | None = None
    pid: int | None = None             # the worker process running it (from its start event)
    submitted_at: float | None = None
    started_at: float | None = None
    future: Any = None
    key: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "skipped", "failed")

    def as_json(self) -> dict[str, Any]:
        out = {"study": self.task.study, "job": self.task.job, "status": self.status, "message": self.message,
               "seconds": None if self.seconds is None else round(self.seconds, 3), "method": self.task.method,
               "attempts": self.attempts, "folder": str(self.task.folder)}
        if self.wall_seconds is not None:
            out["wall_seconds"] = round(self.wall_seconds, 3)
        if self.metrics:
            out["metrics"] = self.metrics
        return out


def summary_line(records: list[JobRecord], workers: int, now: float | None = None) -> str:
    """``done d, skipped s, running r, failed f, left l; ETA h:mm:ss`` (left: queued or waiting).

    The ETA is the work left spread over ``workers``: each unfinished task counts the mean time of the tasks of
    its method done so far (less what a running one has run already). A method none of whose tasks is done yet
    counts the mean over all methods, and the ETA is then only a lower bound: ``ETA >= h:mm:ss``.
    """
    now = time.perf_counter() if now is None else now
    count = {s: sum(r.status == s for r in records) for s in ("done", "skipped", "running", "queued", "failed",
                                                             "pending")}
    times: dict[str, list[float]] = {}
    for r in records:
        if r.status == "done" and r.seconds is not None:
            times.setdefault(r.task.method, []).append(r.seconds)
    every = [t for v in times.values() for t in v]
    eta = "?"
    if every:
        mean_all = sum(every) / len(every)
        work, lower = 0.0, False
        for r in records:
            if r.finished:
                continue
            v = times.get(r.task.method)
            lower = lower or not v
            est = sum(v) / len(v) if v else mean_all
            if r.status == "running" and r.started_at is not None:
                est = max(0.0, est - (now - r.started_at))
            work += est
        s = int(round(work / max(workers, 1)))
        eta = (">= " if lower else "") + f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    left = count["pending"] + count["queued"]
    line = (f"[batch] done {count['done']}, skipped {count['skipped']}, running {count['running']}, "
            f"failed {count['failed']}, left {left}")
    return line + (f"; ETA {eta}" if left + count["running"] else "")


class _Printer:
    def __init__(self, echo: Callable[[str], None] | None):
        self.echo = echo or (lambda s: print(s, file=sys.stderr, flush=True))

    def state(self, r: JobRecord, text: str) -> None:
        self.echo(f"[batch] {r.task.label}: {text}")


def _deps_state(r: JobRecord, by: dict[tuple[str, str], JobRecord]) -> tuple[bool, str | None]:
    """``(ready, failed dependency)`` of a pending task."""
    deps = [by[(r.task.study, d)] for d in r.task.deps]
    if r.task.method == "report":
        return all(d.finished for d in deps), None
    bad = next((d for d in deps if d.status == "failed"), None)
    if bad is not None:
        return False, bad.task.label
    return all(d.status in ("done", "skipped") for d in deps), None


def run_batch(manifest: Manifest, out: str | Path, *, handle=None, start: Callable[[], Any] | None = None,
              retries: int | None = None, echo: Callable[[str], None] | None = None,
              on_change: Callable[[JobRecord], None] | None = None) -> list[JobRecord]:
    """Run every task of ``manifest`` into ``out`` and return their records (``batch.json``/``.html`` written).

    Parameters
    ----------
    handle : :class:`~.cluster.ClusterHandle`, optional
        Where to run (kept open); without it ``start()`` makes one (closed at the end), and without either a
        default local cluster is started — only when some task needs running.
    retries : resubmissions of a task whose worker died (default: the manifest's ``retries``).
    echo : where progress lines go (default: stderr).
    on_change : called with a task's record after each of its state changes (tests, progress hooks).
    """
    from ..utils.atomic import ensure_folder
    from .summary import write_summary

    out = ensure_folder(Path(out))
    retries = manifest.retries if retries is None else int(retries)
    p = _Printer(echo)
    t_start = time.perf_counter()
    records = [JobRecord(t) for t in plan_tasks(manifest, out)]
    by = {(r.task.study, r.task.job): r for r in records}

    def change(r: JobRecord, status: str, text: str | None = None) -> None:
        r.status = status
        p.state(r, text or status)
        if on_change is not None:
            on_change(r)

    for r in records:
        if is_complete(r.task):
            rec = read_done(r.task) or {}
            r.seconds, r.metrics = rec.get("seconds"), rec.get("metrics")
            change(r, "skipped", "skipped (complete, same inputs)")
    own = None
    try:
        if any(r.status == "pending" for r in records):
            if handle is None:
                from .cluster import start_cluster

                handle = own = (start or start_cluster)()
                p.echo(f"[batch] {handle.description}")
                p.echo(f"[batch] Dask dashboard: {handle.dashboard}" if handle.dashboard else
                       f"[batch] Dask dashboard: none ({handle.no_dashboard})")
            _loop(records, by, handle, retries, p, change)
    except KeyboardInterrupt:  # say what was done; the unfinished tasks are failed ("interrupted"), rerun resumes
        for r in records:
            if not r.finished:
                if r.future is not None:
                    r.future.cancel()
                r.message = "interrupted (Ctrl-C); rerun the batch to resume"
                r.status = "failed"
        write_summary(out, records, manifest)
        raise
    finally:
        if own is not None:
            own.close()
    p.echo(summary_line(records, 1) + f"; wall time {time.perf_counter() - t_start:.1f} s")
    write_summary(out, records, manifest)
    p.echo(f"[batch] wrote {out / 'batch.json'} and {out / 'batch.html'}")
    return records


def _submit(r: JobRecord, handle, change) -> None:
    from .execute import run_task

    r.attempts += 1
    r.key = f"{r.task.study}/{r.task.job}#{r.attempts}-{uuid.uuid4().hex[:8]}"
    kw = {"resources": dict(handle.resources)} if handle.resources else {}
    r.future = handle.client.submit(run_task, r.task, key=r.key, pure=False, retries=0, **kw)
    r.submitted_at, r.started_at, r.worker = time.perf_counter(), None, None
    change(r, "queued", "queued" if r.attempts == 1 else f"queued again (attempt {r.attempts})")


def _loop(records, by, handle, retries, p, change) -> None:
    from distributed import wait

    client = handle.client
    last_summary = time.perf_counter()
    workers = handle.expected_workers
    seen = 0
    while not all(r.finished for r in records):
        changed = False
        for r in records:
            if r.status != "pending":
                continue
            ready, failed_dep = _deps_state(r, by)
            if failed_dep is not None:
                r.seconds = 0.0
                r.message = f"not run: {failed_dep} failed"
                change(r, "failed", f"FAILED: {r.message}")
                changed = True
            elif ready:
                _submit(r, handle, change)
                changed = True
        active = [r for r in records if r.status in ("queued", "running")]
        if not active:
            continue
        try:
            wait([r.future for r in active], timeout=POLL_S, return_when="FIRST_COMPLETED")
        except TimeoutError:  # nothing finished in POLL_S: look at what runs
            pass
        seen, started = _started(client, seen)
        for r in active:
            if r.future.status in ("finished", "error", "cancelled"):
                _finish(r, retries, handle, change)
                changed = True
            elif r.status == "queued" and r.key in started:
                ev = started[r.key]
                r.worker, r.pid, r.started_at = ev.get("worker"), ev.get("pid"), time.perf_counter()
                change(r, "running", f"running on {r.worker}")
                changed = True
        now = time.perf_counter()
        if changed or now - last_summary > HEARTBEAT_S:
            p.echo(summary_line(records, workers, now))
            last_summary = now


def _started(client, seen: int) -> tuple[int, dict[str, dict]]:
    """The tasks that said they started since event ``seen`` (key -> event), and the new event count."""
    from .execute import EVENT_TOPIC

    try:
        events = client.get_events(EVENT_TOPIC)
    except Exception:  # noqa: BLE001 - progress only
        return seen, {}
    new = {ev.get("key"): ev for _, ev in list(events)[seen:] if isinstance(ev, dict)}
    return len(events), new


def _finish(r: JobRecord, retries: int, handle, change) -> None:
    fut = r.future
    r.wall_seconds = time.perf_counter() - (r.submitted_at or time.perf_counter())
    if fut.status == "finished":
        res = fut.result()
        r.future = None
        r.seconds, r.message, r.metrics = res.get("seconds"), res.get("message", ""), res.get("metrics")
        if res.get("status") == "done":
            change(r, "done", f"done in {r.seconds:.1f} s" + (" (resumed from its checkpoint)"
                                                               if res.get("resumed") else ""))
        else:
            change(r, "failed", f"FAILED: {r.message}")
        return
    try:
        exc = fut.exception() if fut.status == "error" else None
    except Exception as e:  # noqa: BLE001
        exc = e
    reason = f"{type(exc).__name__}: {' '.join(str(exc).split())}" if exc is not None else "cancelled"
    r.future = None
    if r.attempts <= retries:
        change(r, "pending", f"worker lost ({reason}); retrying ({r.attempts}/{retries})")
        _submit(r, handle, change)
        return
    r.message = f"sirf-ddip batch: its worker died {r.attempts} time(s) (last: {reason})"
    try:   # what the dead worker left half-written goes (the folder is on a file system shared with it)
        from .execute import clear_unfinished

        clear_unfinished(r.task)
    except OSError:
        pass
    change(r, "failed", f"FAILED: {r.message}")
