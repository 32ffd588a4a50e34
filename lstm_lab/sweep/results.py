"""What a study holds: per-variant status (``lstm-lab status``), one row per trial (:func:`load_trials`),
learning curves (:func:`load_curves`), and a digest of the trials (a report is rewritten only when it changed).

Read-only: nothing here writes to a study. A slot's outcome is its latest trial (a retry supersedes the
attempt that was interrupted).
"""

from __future__ import annotations

import hashlib
import pathlib

from lstm_lab._io import read_jsonl
from lstm_lab.sweep import space
from lstm_lab.sweep.storage import grace_period, host, masked_url, open_study, owner_alive_here, stale_numbers, \
    study_dir_info

__all__ = ["study_status", "format_status", "load_trials", "load_curves", "trials_digest", "study_meta",
           "status_of", "first_error_line"]


def first_error_line(error, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(error or "").splitlines() if ln.strip()]
    line = lines[0] if lines else "no error recorded"
    return line if len(line) <= limit else line[:limit - 3] + "..."



_STATE_STATUS = {"COMPLETE": "complete", "RUNNING": "running", "WAITING": "waiting", "PRUNED": "failed"}


def _slot_trials(ostudy) -> dict[str, object]:
    """slot -> its latest trial (a retry supersedes the interrupted one)."""
    latest: dict[str, object] = {}
    for t in ostudy.get_trials(deepcopy=False):
        slot = t.user_attrs.get("slot")
        if slot is not None and (slot not in latest or t.number > latest[slot].number):
            latest[slot] = t
    return latest


def status_of(t) -> str:
    if t.state.name == "FAIL":
        return t.user_attrs.get("status", "failed")
    return _STATE_STATUS.get(t.state.name, t.state.name.lower())


def _dead_reason(t, here: str, stale: set) -> str | None:
    """Why a RUNNING trial's worker is known dead (its pid is gone on this host; or, run elsewhere, its
    heartbeat is stale: ``stale`` holds those trials' numbers); None while it may be alive."""
    ua = t.user_attrs
    alive = owner_alive_here(ua, here)
    if alive is False:
        return f"worker pid {ua['pid']} on {here} is gone"
    if alive is None and t.number in stale:
        return f"no heartbeat for over {grace_period()} s from its worker on {ua.get('host', 'an unknown host')}"
    return None


def study_status(study_dir, *, storage: str | None = None, ostudy=None) -> dict:
    """Per variant: ``planned``, ``done`` (= ``complete`` + ``failed``), ``running``, ``dead`` (running, but its
    worker is gone: the next worker takes it over), ``waiting``, ``failed`` (raised or diverged; ``diverged``
    counts the latter), the ``best`` value so far; the same totals, an ETA, ``failed_trials`` (number, slot,
    status, the first line of the error) and ``dead_trials`` (number, slot, why)."""
    info = study_dir_info(study_dir, storage)
    ostudy = ostudy or open_study(study_dir, storage)
    rec = info["study"]
    sign = 1 if rec["direction"] == "minimize" else -1
    variants: dict[str, dict] = {(v if isinstance(v, str) else v["name"]): None for v in rec["variants"]}
    walls, failed_trials, dead_trials, workers_seen = [], [], [], set()
    here, stale = host(), None
    for slot, t in sorted(_slot_trials(ostudy).items()):
        name = t.user_attrs.get("variant", slot.split("/")[0])
        if variants.get(name) is None:
            variants[name] = {"planned": 0, "complete": 0, "failed": 0, "diverged": 0, "running": 0, "dead": 0,
                              "waiting": 0, "best": None}
        v = variants[name]
        v["planned"] += 1
        st = status_of(t)
        key = {"interrupted": "waiting"}.get(st, st)  # an interrupted slot's retry is waiting (or about to be)
        if key == "running":
            stale = stale_numbers(ostudy) if stale is None else stale
            why = _dead_reason(t, here, stale)
            if why:
                key = "dead"
                dead_trials.append({"number": t.number, "slot": slot, "variant": name, "why": why})
            else:  # a population's K running trials are one worker's
                workers_seen.add((t.user_attrs.get("host"), t.user_attrs.get("pid", t.number)))
        if key in ("failed", "diverged"):
            failed_trials.append({"number": t.number, "slot": slot, "variant": name, "status": st,
                                  "error": first_error_line(t.user_attrs.get("error"))})
        if key == "diverged":  # failed counts every trial that ended without a metric; diverged is a part of it
            v["diverged"] += 1
            key = "failed"
        v[key] = v.get(key, 0) + 1
        if st == "complete":
            if v["best"] is None or sign * t.value < sign * v["best"]:
                v["best"] = t.value
            if t.user_attrs.get("wall_seconds"):
                walls.append(float(t.user_attrs["wall_seconds"]) / max(1, int(t.user_attrs.get("population", 1))))
    variants = {k: v for k, v in variants.items() if v is not None}
    for v in variants.values():
        v["done"] = v["complete"] + v["failed"]
    tot = {k: sum(v[k] for v in variants.values()) for k in ("planned", "done", "complete", "failed", "diverged",
                                                               "running", "dead", "waiting")}
    done = tot["done"]
    left = tot["planned"] - done
    workers = max(1, len(workers_seen))  # wall per trial is already per population member
    eta = (sum(walls) / len(walls)) * left / workers if walls and left else (0.0 if not left else None)
    bests = [v["best"] for v in variants.values() if v["best"] is not None]
    best = (min(bests) if sign > 0 else max(bests)) if bests else None
    return {"study": rec["name"], "metric": rec["metric"], "direction": rec["direction"],
            "storage": masked_url(storage or info["storage"]),
            "variants": variants, **tot, "best": best,
            "eta_seconds": eta, "failed_trials": failed_trials, "dead_trials": dead_trials}


def format_status(st: dict, *, failed: bool = False) -> str:
    """The status table; trials whose worker is dead are listed; ``failed``: every failed or diverged trial
    with the first line of its error."""
    dead = st.get("dead", 0)
    head = ["variant", "planned", "complete", "running"] + (["dead"] if dead else []) + \
        ["waiting", "failed", "(diverged)", f"best {st['metric']}"]

    def row(name, v):
        return [name, v["planned"], v["complete"], v["running"]] + ([v.get("dead", 0)] if dead else []) + \
            [v["waiting"], v["failed"], v["diverged"], "-" if v["best"] is None else f"{v['best']:.4g}"]

    rows = [head] + [row(name, v) for name, v in st["variants"].items()] + [row("total", st)]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    eta = st["eta_seconds"]
    eta_s = "done" if eta == 0 else ("unknown" if eta is None else f"{eta / 60:.1f} min at the current worker count")
    out = f"study {st['study']} ({st['storage']})\n" + "\n".join(lines) + f"\nETA: {eta_s}"
    if st.get("dead_trials"):
        out += "\n" + "\n".join(f"trial {d['number']} {d['slot']}: running (worker dead): {d['why']}; the next "
                                f"`lstm-lab sweep` or `lstm-lab worker` on this study takes it over"
                                for d in st["dead_trials"])
    if failed:
        ft = st.get("failed_trials", [])
        out += f"\nfailed trials: {len(ft)}" + "".join(f"\n  trial {f['number']} {f['slot']}: {f['status']}: "
                                                      f"{f['error']}" for f in ft)
    return out


def trials_digest(study_dir, *, storage: str | None = None) -> str:
    """A digest of every trial's number, state, status and value: a report is rewritten only when it changed."""
    h = hashlib.sha256()
    for t in sorted(open_study(study_dir, storage).get_trials(deepcopy=False), key=lambda t: t.number):
        h.update(f"{t.number}:{t.state.name}:{t.user_attrs.get('status')}:{t.value!r}\n".encode())
    return h.hexdigest()[:16]


def study_meta(study_dir, *, storage: str | None = None) -> dict:
    """What an analysis needs of the study's record: ``name``, ``metric``, ``direction``, ``baseline``,
    ``variants`` (names, in the study's order), ``task`` and ``params`` (config key -> the distribution's
    description and ``optuna_name``)."""
    info = study_dir_info(study_dir, storage)
    rec = info["study"]
    return {"name": rec["name"], "metric": rec["metric"], "direction": rec["direction"], "baseline": rec["baseline"],
            "variants": [v if isinstance(v, str) else v["name"] for v in rec["variants"]],
            "task": rec["base_config"]["task"]["name"], "params": info["params"]}


def load_trials(study_dir, *, storage: str | None = None, all_attempts: bool = False):
    """One row per planned trial (its latest attempt; ``all_attempts=True`` for every attempt):
    ``number, slot, variant, seed, status, value``, ``valid.*``, ``test.*``, ``wall_seconds``, ``workdir``,
    ``error``, ``retry_of`` and one column per hyperparameter (actual values, e.g. momentum not 1 - momentum)."""
    import pandas as pd

    info = study_dir_info(study_dir, storage)
    ostudy = open_study(study_dir, storage)
    trials = ostudy.get_trials(deepcopy=False) if all_attempts else sorted(_slot_trials(ostudy).values(),
                                                                            key=lambda t: t.number)
    params = info["params"]
    rows = []
    for t in trials:
        ua = t.user_attrs
        fixed = {**t.system_attrs.get("fixed_params", {}), **t.params}
        row = {"number": t.number, "slot": ua.get("slot"), "variant": ua.get("variant"), "seed": ua.get("seed"),
               "status": status_of(t), "value": t.value if t.state.name == "COMPLETE" else float("nan")}
        for split in ("valid", "test"):
            for k, v in (ua.get(split) or {}).items():
                row[f"{split}.{k}"] = v if v is not None else float("nan")
        for key, p in params.items():
            x = fixed.get(p["optuna_name"])
            row[key] = space.to_actual(p["kind"], x) if x is not None else None
        row.update(wall_seconds=ua.get("wall_seconds"), steps=ua.get("steps"), population=ua.get("population", 1),
                   workdir=ua.get("workdir"), error=ua.get("error"), retry_of=ua.get("retry_of"),
                   started=t.datetime_start, finished=t.datetime_complete)
        rows.append(row)
    return pd.DataFrame(rows)


def load_curves(study_dir, *, storage: str | None = None, trials=None):
    """Learning curves in long form: ``number, variant, slot, step, split ("train"/"valid"), loss``, read from each
    trial's ``metrics.jsonl`` (the database keeps the validation curve as intermediate values too)."""
    import pandas as pd

    trials = load_trials(study_dir, storage=storage) if trials is None else trials
    rows, missing = [], []
    for t in trials.itertuples():
        path = pathlib.Path(t.workdir) / "metrics.jsonl" if isinstance(t.workdir, str) else None
        if path is None or not path.is_file():
            missing.append(t)
            continue
        for rec in read_jsonl(path, kinds=("train", "valid")):
            if rec.get("loss") is not None:
                rows.append({"number": t.number, "variant": t.variant, "slot": t.slot, "step": rec["step"],
                             "split": rec["kind"], "loss": rec["loss"]})
    if missing:  # run directories not on this machine: the validation curve the database keeps
        by_number = {ft.number: ft for ft in open_study(study_dir, storage).get_trials(deepcopy=False)}
        for t in missing:
            ft = by_number.get(t.number)
            for step, loss in sorted((ft.intermediate_values if ft is not None else {}).items()):
                rows.append({"number": t.number, "variant": t.variant, "slot": t.slot, "step": step,
                             "split": "valid", "loss": loss})
    return pd.DataFrame(rows, columns=["number", "variant", "slot", "step", "split", "loss"])
