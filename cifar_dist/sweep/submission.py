"""Submitting a sweep's points (or a study's workers) as one job array, with the sweep's record
saved around it so that no job is lost: first the submission's intent (its points, no job ids),
then the job ids. The jobs of a submission cut short in between are found again in submitit's
files (`find_jobs`). Also what a submission prints, and the dry run's preview.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cifar_dist.rundir import write_atomic
from cifar_dist.sweep import study
from cifar_dist.sweep.executors import Executor, SubmitError
from cifar_dist.sweep.profiles import ClusterError
from cifar_dist.sweep.record import RECORD, Entry, PointEntry, Submission, SweepRecord, WorkerEntry, save_record
from cifar_dist.sweep.resources import resources_line
from cifar_dist.sweep.spec import Spec
from cifar_dist.sweep.submitit_compat import submitted_tasks
from cifar_dist.sweep.sweepdir import submitit_folder
from cifar_dist.sweep.task import SearchTask, SweepTask, TrainTask
from cifar_dist.tables import format_table


def submit_points(executor: Executor, record: SweepRecord, points: list[Entry]) -> list:
    """Submit `points` (entries of the record) as one array; the jobs. The record is saved first
    with the submission's intent (its points, no job ids), then with the job ids: whatever fails in
    between, status, wait and cancel find the jobs from the intent (`find_jobs`)."""
    r = record.resources
    task = {"env": dict(executor.profile.env), "cpus": r.cpus_per_task, "sweep_dir": str(executor.sweep_dir),
            "local_slots": executor.run_slots(r), "signal_delay_s": r.signal_delay_s}
    tasks = [SearchTask(p.name, **task) if isinstance(p, WorkerEntry) else TrainTask(p.config, **task) for p in points]
    path = executor.sweep_dir / RECORD
    before = path.read_bytes() if path.exists() else None
    submission = Submission(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), points=[p.name for p in points])
    record.submissions.append(submission)
    save_record(executor.sweep_dir, record)  # if this fails, nothing was submitted
    try:
        jobs = executor.submit(record.name, r, tasks)
    except SubmitError as e:
        if found := find_jobs(executor.sweep_dir, record):  # the scheduler took them before submitit failed
            save_found(executor.sweep_dir, record, found)
            raise SubmitError(f"{e}, after the scheduler took job(s) {' '.join(found)}: status, wait and cancel "
                              "act on them") from None
        if before is not None:  # as it was: no job exists for this submission
            write_atomic(path, before)
        raise
    ids = [str(j.job_id) for j in jobs]
    for point, job_id in zip(points, ids):
        point.job_id = job_id
        point.job_ids.append(job_id)
    submission.job_ids = ids
    try:
        save_record(executor.sweep_dir, record)
    except OSError as e:
        raise ClusterError(f"{len(ids)} job(s) submitted ({' '.join(ids)}), but {path} could not be updated "
                           f"({e.strerror or e}): status, wait and cancel find them from their submitit files; cancel, "
                           "resubmit and repair record them") from None
    return jobs


def find_jobs(sweep_dir: Path, record: SweepRecord) -> list[str]:
    """The jobs of submissions cut short (their ids never saved: a full disk, a killed submit),
    found in submitit's files and put in `record` (in memory) as their submission would have; their ids."""
    cut = record.cut_short()
    if not cut:
        return []
    known = {j for p in record.points for j in p.job_ids}
    entries = {p.name: p for p in record.points}
    taken: list[dict[str, str]] = [{} for _ in cut]  # per submission cut short: entry name -> job id found
    for job_id, task in submitted_tasks(submitit_folder(sweep_dir)).items():  # oldest first
        name = Path(task.run_dir).name if isinstance(task, SweepTask) else ""
        k = next((k for k, sub in enumerate(cut) if name in sub.points and name not in taken[k]), None)
        if job_id in known or k is None:
            continue
        taken[k][name] = job_id
        entries[name].job_id = job_id
        entries[name].job_ids.append(job_id)
    for sub, ids in zip(cut, taken):
        sub.job_ids = [ids[name] for name in sub.points if name in ids]
    return [job_id for ids in taken for job_id in ids.values()]


def save_found(sweep_dir: Path, record: SweepRecord, found: list[str]) -> None:
    """Record the job ids `find_jobs` found; where the record still cannot be written, say so and go on."""
    try:
        save_record(sweep_dir, record)
    except OSError as e:
        print(f"{sweep_dir / RECORD}: not updated ({e.strerror or e}); job(s) {' '.join(found) or '(none)'} are found "
              "again next time", file=sys.stderr)


def print_submitted(executor: Executor, record: SweepRecord, points: list[Entry], prog: str) -> None:
    what = "worker(s)" if record.is_study else "point(s)"
    print(f"{record.name}: {len(points)} {what} submitted as {executor.where(len(points))}")
    if record.search:
        print(study.describe_search(record.search))
    print(format_table([[p.name, p.job_id, *_run(p)] for p in points], ["point", "job", "run id", "values"]))
    print(f"sweep dir: {executor.sweep_dir}\nstatus:    {prog} status {executor.sweep_dir}")


def _run(entry: Entry) -> tuple[str, str]:
    """(run id, values) of a point; a worker has neither."""
    return (entry.run_id, entry.describe) if isinstance(entry, PointEntry) else ("", "")


def dry_run(spec: Spec, executor: Executor, record: SweepRecord) -> int:
    sweep_dir = executor.sweep_dir
    points = record.points
    print(f"{spec.name}: {len(points)} {'worker(s)' if record.is_study else 'point(s)'}, cluster profile "
          f"{executor.profile.name}, executor {executor.name}; dry run, nothing submitted")
    if record.search:
        print(study.describe_search(record.search))
    print(format_table([[p.name, *_run(p)] for p in points], ["point", "run id", "values"]))
    print(f"sweep dir: {sweep_dir} (run dirs {sweep_dir / 'runs'}/<point>)")
    print(resources_line(spec.resources))
    print(executor.preview(spec.name, spec.resources, len(points)), end="")
    return 0
