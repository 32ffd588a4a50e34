"""The ``lstm-lab`` command line."""

from __future__ import annotations

import argparse
import sys

from lstm_lab._hints import error_message


def _variants_table() -> str:
    from lstm_lab.cells import VARIANTS, CellSpec, DESCRIPTIONS

    defaults = CellSpec()
    rows = []
    for name, spec in VARIANTS.items():
        flags = [f"{k}={v}" for k, v in spec.flags().items() if k != "family" and v != getattr(defaults, k)]
        rows.append((name, spec.family, ", ".join(flags) or "-", f"{spec.num_params(128, 128):,}",
                     DESCRIPTIONS[name]))
    header = ("name", "family", "flags", "params@128", "description")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'>' if i == 3 else '<'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)


def _count(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is argparse's one-line error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {value}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0; got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def _task_options(extra: list[str], parser) -> dict:
    from lstm_lab.config import parse_value

    """``--key value`` / ``--key=value`` pairs (dashes become underscores) -> task options."""
    opts, i = {}, 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or arg == "--":
            parser.error(f"unexpected argument {arg!r}; task options are given as --name value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                parser.error(f"option {arg} needs a value")
            key, value = arg[2:], extra[i + 1]
            i += 2
        opts[key.replace("-", "_")] = parse_value(value)
    return opts


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def describe_task(name: str, options: dict, *, batch_size: int = 4, seed: int = 0) -> str:
    """What `lstm-lab data` prints: sizes per split, vocabulary, baseline, a decoded sample batch."""
    from lstm_lab import tasks

    task = tasks.get(name, **options)
    info = task.describe()
    kind, size = info["input"]
    lines = [f"task {name}: {task!r}",
             f"input: {kind}, {'vocabulary ' if kind == 'tokens' else 'features '}{size}; "
             f"output: {task.output_size} per step",
             "splits: " + " | ".join(f"{s} {_fmt(n)}" for s, n in info["splits"].items())
             + (" tokens" if task.stateful else " sequences" if "lengths" in info else " examples")]
    if "lengths" in info:
        lines.append("sequence lengths: " + " | ".join(f"{s} {v}" for s, v in info["lengths"].items())
                     + f"; batches padded to {', '.join(map(str, info['padded_lengths']))} steps; loss {info['loss']}")
    if "series" in info:  # forecast: the series, its spacing and splits, the windows
        lines += [f"series: {line}" for line in info["series"]]
    if "class_counts" in info:  # classify: the classes and their counts per split
        lines.append(f"{info['classes']} classes, cases per class: " + " | ".join(
            f"{s} " + " ".join(f"{c}:{n}" for c, n in counts.items()) for s, counts in info["class_counts"].items()))
    if "distinct_characters" in info:
        lines.append(f"distinct characters in the corpus: {info['distinct_characters']}")
    base = info["baseline"]
    if base:
        what = base.get("model", "memoryless predictor")
        lines.append(f"baseline ({what}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in base.items() if k != "model"))
    batch = next(iter(task.batches("train", batch_size=batch_size, seed=seed)))
    lines.append(f"sample batch (train, seed {seed}): inputs {batch.inputs.shape} {batch.inputs.dtype}, "
                 f"targets {batch.targets.shape} {batch.targets.dtype}"
                 + (f", lengths {batch.lengths.tolist()}" if batch.lengths is not None else ""))
    for row in range(min(batch_size, 2)):
        text = task.format_example(batch, row)
        lines.append(f"[{row}] " + (repr(text) if task.stateful else text.replace("\n", "\n    ")))
    return "\n".join(lines)


def _train(args, parser) -> int:
    """Exit codes: 0 done, 2 a usage/config/workdir error (one line), 3 the run diverged, 130 interrupted."""
    import pathlib

    workdir = args.workdir or str(pathlib.Path("runs") / pathlib.Path(args.config).stem)
    try:
        from lstm_lab.config import load_config, parse_value
        from lstm_lab.training import RunConflictError, WorkdirError, train

        overrides = {}
        for item in args.set:
            if "=" not in item:
                parser.error(f"--set expects KEY=VALUE; got {item!r}")
            key, value = item.split("=", 1)
            overrides[key.strip()] = parse_value(value)
        if args.distributed:
            from lstm_lab import distributed

            d = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            print(f"distributed: process {d['process_id']} of {d['num_processes']}, {d['local_devices']} local of "
                  f"{d['devices']} devices", file=sys.stderr)
        elif args.coordinator or args.num_processes is not None or args.process_id is not None:
            parser.error("--coordinator/--num-processes/--process-id need --distributed")
        cfg = load_config(args.config, overrides)
        from lstm_lab._debug import callbacks_from_env

        summary = train(cfg, workdir, force=args.force, resume=args.resume or None, quiet=args.quiet,
                        callbacks=callbacks_from_env())
    except KeyboardInterrupt as e:  # training.TrainingInterrupted says where it stopped and how to resume
        msg = str(e) if e.args else "interrupted; run the same command to resume"
        print(f"lstm-lab train: {msg}", file=sys.stderr)
        return 130
    except (KeyError, TypeError, ValueError, OSError, RunConflictError, WorkdirError) as e:
        print(f"lstm-lab train: error: {error_message(e)}", file=sys.stderr)
        return 2
    if summary["status"] == "diverged":
        print(f"lstm-lab train: the run diverged at step {summary['diverged_at_step']} (non-finite loss); "
              f"lower optim.learning_rate or set optim.clip_norm. Record: {workdir}/summary.json", file=sys.stderr)
        return 3
    return 0


def _study_cmd(args) -> int:
    """sweep / worker / status / report. Errors: one line, exit 2. Ctrl-C: one line, exit 130 (a sweep's or a
    worker's unfinished trials are handed back: the same command resumes)."""
    import json
    import pathlib

    from lstm_lab import sweep
    from lstm_lab.sweep.storage import StorageError, StudyConflictError

    name = f"lstm-lab {args.command}"
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    try:
        if args.command == "worker":
            from lstm_lab.sweep.worker import run_worker

            study, study_dir = sweep.worker_study(args.study, args.dir, args.storage)
            run_worker(study, study_dir, storage=args.storage, population=args.population or study.population,
                       log=log, wait=not args.no_wait, progress=not args.child)
            return 0
        if args.command == "sweep":
            from lstm_lab.analysis.report import report, report_is_current
            from lstm_lab.sweep.results import format_status, study_status
            from lstm_lab.sweep.study import prepare_study

            study = sweep.load_study(args.study)
            study_dir = pathlib.Path(args.dir) if args.dir else sweep.default_dir(study)
            if args.plan_only:
                prepare_study(study, study_dir, storage=args.storage, force=args.force, log=log)
                print(format_status(study_status(study_dir, storage=args.storage)))
                return 0
            st = sweep.run(study, study_dir, workers=args.workers, population=args.population or study.population,
                           storage=args.storage, force=args.force, log=log)
            print(format_status(st))
            if not args.no_report and st["complete"]:
                if args.report or not report_is_current(study_dir, storage=args.storage):
                    path = report(study_dir, storage=args.storage)
                    print(f"report: {path} (and {path.with_suffix('.html')})")
                else:
                    print(f"report: {study_dir / 'report' / 'report.md'} is up to date (no trial changed since it "
                          f"was written; --report writes it again)")
            return 0 if st["waiting"] == 0 and st["running"] == 0 and st["dead"] == 0 else 1
        if args.command == "status":
            from lstm_lab.sweep.results import format_status

            st = sweep.status(args.study_dir, storage=args.storage)
            print(json.dumps(st, indent=2, default=str) if args.json else format_status(st, failed=args.failed))
            return 0
        from lstm_lab.analysis.report import report

        path = report(args.study_dir, args.out, storage=args.storage)
        print(f"report: {path} (and {path.with_suffix('.html')})")
        return 0
    except KeyboardInterrupt:
        if args.command not in ("sweep", "worker"):
            print(f"{name}: interrupted", file=sys.stderr)
        elif not getattr(args, "child", False):  # a sweep's own workers: the sweep says it once
            print("interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except (sweep.StudyError, StudyConflictError, StorageError, FileNotFoundError, KeyError, TypeError,
            ValueError) as e:
        print(f"{name}: error: {error_message(e)}", file=sys.stderr)
        return 2


def _dashboard(args) -> int:
    """optuna-dashboard on a study's storage (found as ``status`` finds it), until Ctrl-C. Errors: one line, exit 2."""
    import socket

    from lstm_lab import sweep
    from lstm_lab.sweep.storage import (StorageError, StudyConflictError, connect, masked_url, quiet_optuna,
                                        study_dir_info)

    name = "lstm-lab dashboard"
    try:
        import optuna_dashboard
    except ImportError:
        print(f"{name} needs the dashboard extra: pip install -e '.[dashboard]'", file=sys.stderr)
        return 2
    try:
        quiet_optuna()
        info = study_dir_info(args.study, args.storage)
        url, study_name = info["storage"], info["study"]["name"]
        rdb = connect(url, create=False)
        try:
            study_id = rdb.get_study_id_from_name(study_name)
        except KeyError:
            raise StudyConflictError(f"storage {masked_url(url)!r} has no study named {study_name!r}.") from None
        shown = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
        shown = f"[{shown}]" if ":" in shown else shown
        print(f"study {study_name!r} in {masked_url(url)}: open http://{shown}:{args.port}/dashboard/studies/"
              f"{study_id} (Ctrl-C stops the dashboard)", flush=True)
        optuna_dashboard.run_server(rdb, host=args.host, port=args.port)  # returns on Ctrl-C
    except KeyboardInterrupt:
        pass
    except (sweep.StudyError, StudyConflictError, StorageError, FileNotFoundError, KeyError, TypeError, ValueError,
            OSError) as e:
        import errno

        hint = " (pass another --port)" if getattr(e, "errno", None) == errno.EADDRINUSE else ""
        print(f"{name}: error: {error_message(e)}{hint}", file=sys.stderr)
        return 2
    return 0


def _demo(args, parser) -> int:
    """``lstm-lab train experiments/demo.py`` with the flags as overrides, then one line against the baseline."""
    import pathlib
    import tempfile
    import time

    import lstm_lab
    from lstm_lab.cells import resolve_cell
    from lstm_lab.config import load_config
    from lstm_lab.training import train

    try:
        resolve_cell(args.cell)
    except ValueError as e:
        parser.error(str(e))
    path = pathlib.Path(lstm_lab.__file__).resolve().parents[1] / "experiments" / "demo.py"
    if not path.exists():
        parser.error(f"the demo is the experiment file {path}, which only a source checkout has "
                     f"(git clone, then pip install -e .)")
    cfg = load_config(path, {"model.cell": args.cell, "train.steps": args.steps, "task.options": {"T": args.length},
                             "model.hidden_size": args.hidden_size, "optim.learning_rate": args.learning_rate,
                             "train.seed": args.seed})
    print(f"adding problem, T={args.length}: {args.cell} with {args.hidden_size} units, Adam lr={args.learning_rate}, "
          f"batch {cfg.train.batch_size} ({path.name}); predicting 1.0 scores MSE {1 / 6:.3f}", file=sys.stderr)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lstm_lab_demo_") as tmp:
        s = train(cfg, args.workdir or tmp, log=lambda m: print(m, file=sys.stderr))
    valid, base = s["valid"]["mse"], s["baseline"]["mse"]
    verdict = "learned the task" if valid < 0.1 * base else ("beats the baseline" if valid < base else
                                                             "does not beat the baseline yet (more --steps)")
    print(f"done: validation MSE {valid:.4f} = {100 * valid / base:.1f}% of the baseline {base:.3f} "
          f"(always predicting 1.0) after {s['steps']} steps in {time.perf_counter() - start:.1f}s: {verdict}")
    return 0


IMPORT_ENV = "LSTM_LAB_IMPORT"  # os.pathsep-separated modules/files to import (what --import passes to workers)


def _import_user_modules(imports: list[str]) -> None:
    """``--import`` (and LSTM_LAB_IMPORT, set for this process's children): modules or files whose tasks to
    register."""
    import os
    import pathlib

    from lstm_lab.tasks.registry import import_tasks

    inherited = [x for x in os.environ.get(IMPORT_ENV, "").split(os.pathsep) if x]
    mine = [str(pathlib.Path(x).resolve()) if x.endswith(".py") or pathlib.Path(x).is_file() else x
            for x in imports]
    for spec in inherited + [x for x in mine if x not in inherited]:
        import_tasks(spec)
    if mine:
        os.environ[IMPORT_ENV] = os.pathsep.join(inherited + [x for x in mine if x not in inherited])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lstm-lab", description="LSTM-family cells, experiments and studies.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("variants", help="list every cell preset: family, flags, parameters at in = hidden = 128")
    demo = sub.add_parser("demo", help="train experiments/demo.py: a small LSTM on the adding problem (CPU, 10 s)")
    demo.add_argument("--cell", default="lstm", help="preset name (see `lstm-lab variants`)")
    demo.add_argument("--steps", type=_count, default=400)
    demo.add_argument("--length", type=_count, default=30, help="sequence length T")
    demo.add_argument("--hidden-size", type=_count, default=32)
    demo.add_argument("--learning-rate", type=_positive_float, default=1e-2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workdir", help="keep the run here (default: a temporary directory)")
    data = sub.add_parser("data", help="describe a task's data: split sizes, vocabulary, baseline, a sample batch",
                          epilog="Task options follow as --name value, e.g. "
                                 "lstm-lab data char_lm --path ../shared/data/tinyshakespeare.txt --seq-len 64")
    data.add_argument("task", help="copy, adding, char_lm, word_lm or a registered task")
    data.add_argument("--batch-size", type=_count, default=4)
    data.add_argument("--seed", type=int, default=0)
    tr = sub.add_parser("train", help="train one config: lstm-lab train experiments/copy.py [--set key=value ...]")
    tr.add_argument("config", help="an experiment file (experiments/*.py) or a run's config.json")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set model.cell=cifg --set task.options.T=50")
    tr.add_argument("--workdir", help="run directory (default runs/<config name>)")
    tr.add_argument("--resume", action="store_true", help="require a checkpoint in the workdir and resume it")
    tr.add_argument("--force", action="store_true", help="move a different run in the workdir aside and start over")
    tr.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    tr.add_argument("--distributed", action="store_true",
                    help="one run over several processes/machines (jax.distributed; SLURM/MPI detected, or the "
                         "three flags below, or LSTM_LAB_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID)")
    tr.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    tr.add_argument("--num-processes", type=int, help="how many processes take part (with --distributed)")
    tr.add_argument("--process-id", type=int, help="this process's id, 0 .. N-1 (with --distributed)")
    sa = sub.add_parser("sample", help="sample text from a trained char_lm or word_lm run")
    sa.add_argument("workdir")
    sa.add_argument("--prompt", default="")
    sa.add_argument("--length", type=_count, default=300, help="tokens to generate (>= 1)")
    sa.add_argument("--temperature", type=_positive_float, default=1.0)
    sa.add_argument("--seed", type=int, default=0)
    sw = sub.add_parser("sweep", help="run a study: variants x hyperparameters x seeds (resumable), then report",
                        epilog="Example: lstm-lab sweep experiments/quick.py --workers 2 --population 8")
    wk = sub.add_parser("worker", help="one more worker on a study that `lstm-lab sweep` created (any machine)",
                        epilog="Example: PGPASSWORD=... lstm-lab worker /shared/studies/odyssey_char_lm, or "
                               "lstm-lab worker odyssey_char_lm --storage postgresql://user@dbhost/lstm_lab (the "
                               "password from PGPASSWORD, ~/.pgpass or LSTM_LAB_STORAGE: never stored on disk)")
    sw.add_argument("study", help="a study file (experiments/quick.py, experiments/odyssey_*.py)")
    wk.add_argument("study", help="a study file, a study directory, or (with --storage) a study's name")
    for p in (sw, wk):
        p.add_argument("--dir", help="study directory (default studies/<study name>)")
        p.add_argument("--population", type=int, default=None, metavar="K",
                       help="train up to K trials of the same shape as one vmapped program (default: the study's)")
        p.add_argument("--storage", help="an SQLAlchemy URL (default: sqlite study.db in the study directory); "
                                          "its password is never written to disk (study.json stores the URL "
                                          "without it: give it again here, in LSTM_LAB_STORAGE, PGPASSWORD or "
                                          "~/.pgpass)")
    sw.add_argument("--workers", type=int, default=1, metavar="N", help="N local worker processes")
    sw.add_argument("--force", action="store_true", help="move a different study in --dir aside and start over")
    rep = sw.add_mutually_exclusive_group()
    rep.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    rep.add_argument("--report", action="store_true",
                     help="write the report even when no trial changed since it was last written")
    sw.add_argument("--plan-only", action="store_true",
                    help="create the study and enqueue its trials, run nothing (then start workers anywhere)")
    wk.add_argument("--no-wait", action="store_true",
                    help="exit when nothing is waiting, even while other workers' trials still run")
    wk.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # started by `sweep --workers N`
    stt = sub.add_parser("status", help="per-variant progress of a study: planned/done/running/failed, best, ETA")
    stt.add_argument("study_dir", help="a study directory, or (with --storage) a study's name")
    stt.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    stt.add_argument("--failed", action="store_true",
                     help="list every failed or diverged trial with the first line of its error")
    stt.add_argument("--storage", help="the study's SQLAlchemy URL if not the one in study.json")
    rp = sub.add_parser("report", help="write report.md/.html, figures and trials.csv for a study")
    rp.add_argument("study_dir", help="a study directory, or (with --storage) a study's name")
    rp.add_argument("--out", help="output directory (default <study_dir>/report)")
    rp.add_argument("--storage", help="the study's SQLAlchemy URL if not the one in study.json")
    dash = sub.add_parser("dashboard", help="a live view of a study in optuna-dashboard (the dashboard extra)",
                          epilog="Example: lstm-lab dashboard studies/odyssey_jsb, then open the URL it prints")
    dash.add_argument("study", help="a study directory, or (with --storage) a study's name")
    dash.add_argument("--storage", help="the study's SQLAlchemy URL if not the one in study.json")
    dash.add_argument("--host", default="127.0.0.1",
                      help="the address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    dash.add_argument("--port", type=int, default=8080, help="the port to listen on (default 8080)")
    for p in sub.choices.values():
        p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                       help="import this module or .py file first, for the tasks it registers (repeatable; worker "
                            "processes inherit it through LSTM_LAB_IMPORT)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "data":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _import_user_modules(args.imports)
    except ValueError as e:
        print(f"lstm-lab {args.command}: error: {error_message(e)}", file=sys.stderr)
        return 2
    if args.command == "data":
        try:
            print(describe_task(args.task, _task_options(extra, data), batch_size=args.batch_size, seed=args.seed))
        except (ValueError, TypeError, OSError, ImportError, KeyError) as e:
            print(f"lstm-lab data: error: {e}", file=sys.stderr)
            return 2
    elif args.command == "train":
        return _train(args, tr)
    elif args.command in ("sweep", "worker", "status", "report"):
        return _study_cmd(args)
    elif args.command == "dashboard":
        return _dashboard(args)
    elif args.command == "sample":
        from lstm_lab.training import sample

        try:
            print(sample(args.workdir, prompt=args.prompt, length=args.length, temperature=args.temperature,
                         seed=args.seed))
        except (ValueError, OSError) as e:
            print(f"lstm-lab sample: error: {e}", file=sys.stderr)
            return 2
    elif args.command == "variants":
        print(_variants_table())
    elif args.command == "demo":
        return _demo(args, parser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
