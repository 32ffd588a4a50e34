"""Multi-host training: one run over every device of several processes (machines).

    lstm-lab train experiments/char_lm.py --distributed                      # under SLURM (srun), Open MPI, k8s
    lstm-lab train experiments/char_lm.py --distributed --coordinator host0:1234 --num-processes 2 --process-id 0

:func:`initialize` calls :func:`jax.distributed.initialize` with the coordinator address, the number of
processes and this process's id taken from the arguments, else from ``LSTM_LAB_COORDINATOR``,
``LSTM_LAB_NUM_PROCESSES`` and ``LSTM_LAB_PROCESS_ID``, else from the cluster JAX detects (SLURM,
Open MPI, Kubernetes...). Training then shards each global batch across all processes' devices (data
parallel, as on one machine with several devices): every process computes the same global batch
(batches are a function of the seed and the step) and holds its rows. Process 0 writes the run
directory's records (config, metrics, summary); every process takes part in checkpoints, which need the
run directory on a filesystem all processes share. On the CPU the collectives go through Gloo.
"""

from __future__ import annotations

import os

__all__ = ["initialize", "is_primary", "process_count"]

_ENV = {"coordinator": "LSTM_LAB_COORDINATOR", "num_processes": "LSTM_LAB_NUM_PROCESSES",
        "process_id": "LSTM_LAB_PROCESS_ID"}


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               timeout: int = 300) -> dict:
    """Join this process to a multi-process JAX run. Must run before anything touches a JAX device.
    Returns ``{"process_id", "num_processes", "devices", "local_devices"}``."""
    import jax

    coordinator = coordinator or os.environ.get(_ENV["coordinator"]) or None
    num_processes = num_processes if num_processes is not None else _env_int("num_processes")
    process_id = process_id if process_id is not None else _env_int("process_id")
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("--distributed: give all of --coordinator, --num-processes and --process-id (or "
                         f"{', '.join(_ENV.values())}), or none of them to let JAX read the cluster (SLURM, MPI); "
                         f"got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r}.")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--distributed: process id {process_id} is not in [0, {num_processes}).")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through Gloo
    except Exception:  # noqa: BLE001 - an older/newer JAX without this option: its default
        pass
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout)
    except ValueError as e:
        raise ValueError(f"--distributed: JAX could not find the cluster ({e}); pass --coordinator, "
                         f"--num-processes and --process-id.") from None
    return {"process_id": jax.process_index(), "num_processes": jax.process_count(),
            "devices": len(jax.devices()), "local_devices": len(jax.local_devices())}


def _env_int(key: str) -> int | None:
    raw = os.environ.get(_ENV[key])
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{_ENV[key]}={raw!r}: expected an integer.") from None


def is_primary() -> bool:
    """True in process 0 (the one that writes records); always True in a single-process run."""
    import jax

    return jax.process_index() == 0


def process_count() -> int:
    import jax

    return jax.process_count()
