"""Slurm sweeps: spec -> validated points -> one submitit job array -> exit.

    cifar-dist sweep SPEC.yaml [--dry-run] [--executor auto|slurm|local|debug] [--sweep-dir DIR] [--max-points N]
    cifar-dist sweep --config NAME|PATH [--grid KEY=V1,V2 ...] [key=value ...] [--cluster PROFILE] [--name NAME]
                     [--print-spec] [--dry-run] ...
    cifar-dist sweep -m|--multirun --config NAME|PATH KEY=V1,V2 ... [key=value ...] ...
    cifar-dist sweep status SWEEP_DIR [--json] [--retry-for S]
    cifar-dist sweep wait SWEEP_DIR [--timeout S] [--poll S] [--retry-for S]
    cifar-dist sweep cancel SWEEP_DIR [--retry-for S]
    cifar-dist sweep resubmit SWEEP_DIR --failed | --workers N [--retry-for S]
    cifar-dist sweep repair SWEEP_DIR [--retry-for S]

(`python jobs/submit.py ...` is the same command.) A sweep is a spec file, or the command line's
spelling of one (cli_spec.py): `--config` is its `base:`, each `--grid KEY=V1,V2` (or, after `-m`
as Hydra users type it, each `KEY=V1,V2`) a `sweep.grid` key, the other `key=value` items its
`overrides`, `resources.KEY=VALUE` items its `resources:`, `--cluster` its `cluster:`. Both go
through `spec.read_spec`, so a command-line sweep is exactly its YAML twin, which `--print-spec`
prints.

A spec with `search:` instead of `sweep:` runs a study (study.py, worker.py): its "points" are workers that
take trials from an Optuna study in the sweep dir; `status` shows the trials, `resubmit --workers N`
adds workers to the same study. `repair` records the job ids of a submission cut short (the
record could not be saved after the scheduler took the jobs: status, wait and cancel find them
anyway), and rebuilds a study journal that cannot be read or lost trials from the trials' records.

The spec's `cluster:` names a cluster *profile* (profiles.py: partitions, node sizes, module
loads, task environment). `--executor` picks the submitit *executor* (executors.py): `slurm`
(sbatch), `local` (processes on this machine, no Slurm), `debug` (in this process, one point
after another), or `auto` (default): Slurm when sbatch and srun are on PATH, else local.
"cluster" means one thing, the profile (the cluster's facts): `--cluster` names a command-line
sweep's profile, and beside a spec file (which names its own) it is an error that names `--executor`.

Exit codes: 0 done (a study: its trials all ended, whatever became of a worker); 1 some point did
not finish (`wait`), the scheduler refused (sbatch, scancel failed), or the record of jobs it took
could not be saved; 2 a mistake in the spec or the command line, or the sweep dir is taken or busy
(another submit, resubmit or cancel holds it), reported in one line before anything is submitted
or written; 3 the scheduler could not be reached (squeue kept failing for --retry-for seconds,
default 600, while status, wait, cancel and resubmit asked again with backoff); 124 `wait --timeout`
ran out.

Not tenacity for riding out an outage: `ask_queue`'s last pause ends exactly at --retry-for and it says one line
as the outage starts and one as it ends, which tenacity needs a custom wait and two callbacks for (longer than the loop).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cifar_dist.errors import UserError
from cifar_dist.sweep import journal, study
from cifar_dist.sweep.cli_spec import cli_spec, spec_yaml
from cifar_dist.sweep.executors import EXECUTORS, Executor, QueueError, choose_executor
from cifar_dist.sweep.points import MAX_POINTS, make_points
from cifar_dist.sweep.profiles import ClusterError, Profile, load_profile
from cifar_dist.sweep.record import RECORD, PointEntry, SweepRecord, load_record
from cifar_dist.sweep.resources import check_fits
from cifar_dist.sweep.spec import Spec, load_spec, read_spec
from cifar_dist.sweep.states import ACTIVE, MISMATCH, RESUBMITTABLE, PointState, foreign, point_states, status_table
from cifar_dist.sweep.submission import dry_run, find_jobs, print_submitted, save_found, submit_points
from cifar_dist.sweep.sweepdir import changing, check_free, discard, mark_cancelled

COMMANDS = ("status", "wait", "cancel", "resubmit", "repair")
EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 1, 2, 3, 124
# How long status, wait, cancel and resubmit keep asking a scheduler that does not answer (squeue
# failing: a controller restarting or failing over) before exit 3: a restart takes seconds to a
# few minutes; a cluster still silent after this is down for longer than a wait should hide.
RETRY_FOR_S = 600.0
BACKOFF_S = (2.0, 60.0)  # the first and the longest pause between tries; doubling in between


# ---------------------------------------------------------------------------- submit


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec) if args.spec else read_spec(args.spec_data, Path.cwd())
    if args.print_spec:
        make_points(spec, Path("sweeps") / spec.name, "0" * 6, max_points=args.max_points)  # every point's config is valid
        print(spec_yaml(args.spec_data), end="")
        return 0
    profile = load_profile(spec.cluster)
    check_fits(spec.resources, profile)
    kind, note = choose_executor(args.executor)
    sweep_dir = Path(args.sweep_dir or Path("sweeps") / spec.name).absolute()
    executor = kind(sweep_dir, profile)
    executor.check(spec.resources)
    check_free(sweep_dir)  # early, for the dry run too; `changing` claims it atomically
    uid = uuid.uuid4().hex[:6]  # run ids stay unique (wandb) when a sweep name is reused
    record = new_record(spec, profile, executor, uid)
    if spec.search:
        record.base_config = study.study_base_config(spec, sweep_dir, uid)
        record.points = study.make_workers(0, spec.search.workers)
    else:
        record.points = make_points(spec, sweep_dir, uid, max_points=args.max_points)
    if args.dry_run:
        return dry_run(spec, executor, record)
    if note:
        print(note)
    executor.connect()
    try:
        with changing(sweep_dir, "submit", new=True) as created:
            try:
                if args.spec:
                    shutil.copyfile(args.spec, sweep_dir / "spec.yaml")
                else:  # a command-line sweep keeps its YAML twin
                    (sweep_dir / "spec.yaml").write_text(spec_yaml(args.spec_data))
                if record.is_study:
                    study.create_study(sweep_dir, record)
                jobs = submit_points(executor, record, record.points)
            except BaseException:
                if not any(p.job_id for p in record.points):
                    discard(sweep_dir, created)  # nothing half-written: no job exists for it
                raise
    except OSError as e:  # before the scheduler was asked (submit_points says what happens after)
        raise ClusterError(f"{sweep_dir}: cannot write ({e.strerror or e}); nothing submitted") from None
    print_submitted(executor, record, record.points, args.prog)
    executor.finish(jobs)
    return 0


def new_record(spec: Spec, profile: Profile, executor: Executor, uid: str) -> SweepRecord:
    """The record of a new sweep, without its points."""
    return SweepRecord(name=spec.name, uid=uid, profile=profile.name, profile_path=profile.path, executor=executor.name,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), submitted_from=str(Path.cwd()),
                       resources=spec.resources, search=spec.search)




# ---------------------------------------------------------------------------- status, wait, cancel, resubmit


@dataclass
class Sweep:
    """An existing sweep dir: its record and the executor its jobs went to (connected to its scheduler)."""

    dir: Path
    record: SweepRecord
    executor: Executor


def open_sweep(path: str, record_found: bool = False) -> Sweep:
    """The sweep, with the jobs of a submission cut short found (`find_jobs`), and recorded where
    `record_found` (a command holding the sweep dir: cancel, resubmit, repair)."""
    sweep_dir = Path(path).absolute()
    record = load_record(sweep_dir)
    profile = load_profile(record.profile, record.profile_path)
    executor = EXECUTORS[record.executor](sweep_dir, profile)
    executor.connect()
    if found := find_jobs(sweep_dir, record):
        print(f"{sweep_dir / RECORD}: a submission's job ids were never recorded; found in submitit's files: "
              f"{' '.join(found)}" + ("" if record_found else " (cancel, resubmit or repair records them)"),
              file=sys.stderr)
    if record_found and (found or record.cut_short()):
        # This command holds the dir, so no submit is under way: an intent still without jobs came to nothing.
        record.submissions = [s for s in record.submissions if s.job_ids]
        save_found(sweep_dir, record, found)
    return Sweep(sweep_dir, record, executor)


def sweep_states(sweep: Sweep, retry_for: float) -> list[PointState]:
    return point_states(sweep.dir, sweep.record, ask_queue(sweep, retry_for))


def ask_queue(sweep: Sweep, retry_for: float) -> dict[str, str]:
    """The executor's queue states. While the scheduler cannot be asked, ask again with backoff
    for up to `retry_for` seconds, saying so in one line (and one more when it answers again)."""
    start, pause, said = time.monotonic(), BACKOFF_S[0], False
    while True:
        try:
            queue = sweep.executor.queue_states(sweep.record.job_ids())
        except QueueError as e:
            waited = time.monotonic() - start
            if waited >= retry_for:
                raise QueueError(f"{e} (for {waited:.0f} s; the jobs may still be running)") from None
            if not said:
                print(f"{e}; asking again for up to {retry_for:g} s", file=sys.stderr, flush=True)
                said = True
            time.sleep(min(pause, retry_for - waited))
            pause = min(2 * pause, BACKOFF_S[1])
            continue
        if said:
            print(f"the scheduler answers again, after {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
        return queue


def cmd_status(args: argparse.Namespace) -> int:
    sweep = open_sweep(args.sweep_dir)
    states = sweep_states(sweep, args.retry_for)
    record = sweep.record
    trials = study.trial_table(sweep.dir, record, states) if record.search else None
    if args.json:
        workers = [s.to_dict() for s in states]
        print(json.dumps({**trials, "workers": workers} if trials else workers, indent=1))
    else:
        print(f"{record.name} ({record.executor} executor, profile {record.profile}): {sweep.dir}")
        if trials and record.search:
            print(study.status_text(trials, record.search.metric) + "\nworkers:")
        print(status_table(states))
    return 0


# A point read as ended without a result is looked at again this much later before `wait` believes
# it: between a requeued Slurm job's old and new life, squeue and the result pickle may for a moment
# show neither, which reads as "ended without a result".
SETTLE_SECONDS = 10.0


def cmd_wait(args: argparse.Namespace) -> int:
    sweep = open_sweep(args.sweep_dir)
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    seen_over = False
    while True:
        states = sweep_states(sweep, args.retry_for)
        if not any(s.state in ACTIVE for s in states):
            if seen_over or all(s.state in ("done", "cancelled") for s in states):
                print(status_table(states))
                # A study: its trials, whatever became of a worker whose trial was retried by another.
                done = study.all_ended(sweep.dir, sweep.record) if sweep.record.is_study else all(
                    s.state == "done" for s in states)
                return 0 if done else EXIT_FAILED
            seen_over = True
            time.sleep(SETTLE_SECONDS)
            continue
        seen_over = False
        if deadline is not None and time.monotonic() >= deadline:
            print(status_table(states))
            print(f"wait: timed out after {args.timeout:g} s", file=sys.stderr)
            return EXIT_TIMEOUT
        time.sleep(args.poll)


def cmd_cancel(args: argparse.Namespace) -> int:
    with changing(Path(args.sweep_dir).absolute(), "cancel"):
        sweep = open_sweep(args.sweep_dir, record_found=True)
        active = [s.job_id for s in sweep_states(sweep, args.retry_for) if s.state in ACTIVE]
        if not active:
            print("cancel: nothing queued or running")
            return 0
        try:
            mark_cancelled(sweep.dir, active)  # first: the tasks' SIGTERM handler must see it
        except OSError as e:  # a full disk: the jobs are stopped all the same
            print(f"cancel: the cancel list could not be written ({e.strerror or e}); cancelling anyway",
                  file=sys.stderr)
        sweep.executor.cancel(active)
    print(f"cancel: {len(active)} job(s): {' '.join(active)}")
    return 0


def cmd_resubmit(args: argparse.Namespace) -> int:
    if args.workers < 0:
        raise UserError(f"--workers: must be >= 1, got {args.workers}")
    if not args.failed and not args.workers:
        raise UserError("resubmit: say which: --failed (the failed, stopped, cancelled and mismatched points, or a "
                        "study's workers) or --workers N (N more workers for a study)")
    with changing(Path(args.sweep_dir).absolute(), "resubmit"):
        sweep = open_sweep(args.sweep_dir, record_found=True)
        if args.workers and not sweep.record.is_study:
            raise UserError("--workers: this sweep dir holds a grid/random sweep, not a study")
        points = []
        states = sweep_states(sweep, args.retry_for) if args.failed else []
        for state, point in zip(states, sweep.record.points):
            why = foreign(point, Path(point.run_dir)) if isinstance(point, PointEntry) and state.state == MISMATCH else ""
            if why:  # its job would only fail on the run dir: say so here instead
                print(f"resubmit: point {state.name} left alone: {why}; move its run dir away to train it")
            elif state.state in RESUBMITTABLE:
                points.append(point)
        if args.workers:  # recorded with their job ids once submitted (submit_points saves the record)
            added = study.make_workers(len(sweep.record.points), args.workers)
            sweep.record.points += added
            points += added
        if not points:
            print("resubmit: no failed, stopped, cancelled or mismatched points")
            return 0
        jobs = submit_points(sweep.executor, sweep.record, points)  # same run dirs: each resumes from its checkpoints
    print_submitted(sweep.executor, sweep.record, points, args.prog)
    sweep.executor.finish(jobs)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    with changing(Path(args.sweep_dir).absolute(), "repair"):
        sweep = open_sweep(args.sweep_dir, record_found=True)
        if not sweep.record.is_study:
            print("repair: the record holds every job id; nothing else to repair in a grid/random sweep")
            return 0
        try:
            study.checked_trials(sweep.dir, study.load_study(sweep.dir, sweep.record))
        except study.JournalError as e:
            problem = e.problem
        else:
            print(f"repair: {study.JOURNAL} holds every trial its run dirs show; nothing to rebuild")
            return 0
        if active := [s.name for s in sweep_states(sweep, args.retry_for) if s.state in ACTIVE]:
            raise UserError(f"repair: worker(s) {' '.join(active)} still queued or running (they write the journal): "
                            f"cancel them first; then repair, and `resubmit --failed` goes on with the study")
        print(f"repair: {study.JOURNAL}: {problem}")
        print(f"repair: {journal.rebuild(sweep.dir, sweep.record)}; `{args.prog} resubmit {sweep.dir} --failed` "
              "goes on with the study")
    return 0


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str], prog: str) -> argparse.Namespace:
    if argv and argv[0] in COMMANDS:
        parser = argparse.ArgumentParser(prog=f"{prog} {argv[0]}")
        parser.add_argument("sweep_dir", metavar="SWEEP_DIR")
        parser.add_argument("--retry-for", type=float, default=RETRY_FOR_S, metavar="S",
                            help=f"ask a scheduler that does not answer again for up to S seconds, then exit 3 "
                                 f"(default {RETRY_FOR_S:g})")
        if argv[0] == "status":
            parser.add_argument("--json", action="store_true", help="one JSON object per point")
        if argv[0] == "wait":
            parser.add_argument("--timeout", type=float, help=f"give up after this many seconds (exit {EXIT_TIMEOUT})")
            parser.add_argument("--poll", type=float, default=10.0, help="seconds between checks (default 10)")
        if argv[0] == "resubmit":
            parser.add_argument("--failed", action="store_true",
                                help="the failed, stopped, cancelled and mismatched points (not those holding another "
                                     "run), or a study's workers")
            parser.add_argument("--workers", type=int, default=0, metavar="N", help="a study: N more workers")
        args = parser.parse_args(argv[1:])
        args.command, args.prog = argv[0], prog
        return args
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0] + " A spec file, or the same from the command line.",
        epilog=f"the sweep dir afterwards: {prog} status|wait|cancel|resubmit|repair SWEEP_DIR ('{prog} status --help')")
    parser.add_argument("items", nargs="*", metavar="SPEC.yaml | key=value",
                        help="a sweep spec file; or, with --config, overrides of every point (key=value), "
                             "resources (resources.KEY=VALUE) and, after -m, swept keys (KEY=V1,V2)")
    parser.add_argument("--dry-run", action="store_true", help="print the points and the sbatch script; submit nothing")
    parser.add_argument("--executor", choices=["auto", *EXECUTORS], default="auto",
                        help="slurm, local (no Slurm), debug (in this process); auto = slurm if sbatch is on PATH")
    parser.add_argument("--sweep-dir", help="default: sweeps/<name>")
    parser.add_argument("--max-points", type=int, default=MAX_POINTS, help=f"refuse larger sweeps (default {MAX_POINTS})")
    cli = parser.add_argument_group("a sweep from the command line (instead of SPEC.yaml)")
    cli.add_argument("--config", action="append", metavar="NAME|PATH", help="the base config (a spec's base:)")
    cli.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="sweep KEY over these values (repeat it: the grid is the product, the last key fastest)")
    cli.add_argument("-m", "--multirun", action="store_true",
                     help="as in Hydra: every KEY=V1,V2 item is swept like --grid (write a list value as KEY=[a,b])")
    cli.add_argument("--cluster", metavar="PROFILE", help="the cluster profile (a spec's cluster:; default local)")
    cli.add_argument("--name", help="the sweep's name (default: the config's name)")
    cli.add_argument("--print-spec", action="store_true", help="print the spec YAML these arguments make, and exit")
    args = parser.parse_intermixed_args(argv)
    args.command, args.prog = "submit", prog
    files, pairs = [i for i in args.items if "=" not in i], [i for i in args.items if "=" in i]
    given = [flag for flag, on in (("--config", args.config), ("--grid", args.grid), ("-m", args.multirun),
                                   ("--name", args.name), ("--print-spec", args.print_spec), ("key=value", pairs)) if on]
    if len(files) > 1:
        raise UserError(f"{' '.join(files)}: one spec file per sweep")
    if files and given:
        raise UserError(f"{files[0]} and {', '.join(given)}: give a spec file or a sweep on the command line, not both")
    if files and args.cluster is not None:
        raise UserError(f"--cluster: the spec names its cluster profile itself (cluster:); where its points run is "
                        f"--executor (--executor {args.cluster})")
    if not files and not args.config:
        raise UserError("give a sweep spec file, or --config NAME with --grid KEY=V1,V2 (or -m KEY=V1,V2 ...)")
    args.spec = files[0] if files else None
    args.spec_data = None if files else cli_spec(args.config, args.grid, pairs, args.multirun, args.cluster, args.name)
    return args




def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`prog`: the command as typed (`cifar-dist sweep`), for usage lines and hints; by default this script's."""
    prog = prog or f"python {sys.argv[0]}"
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, prog)
        command = {"submit": cmd_submit, "status": cmd_status, "wait": cmd_wait, "cancel": cmd_cancel,
                   "resubmit": cmd_resubmit, "repair": cmd_repair}[args.command]
        return command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
