"""The one Ray start-up helper, for entry points only (CLI commands, ``jobs/*.py``, benchmarks).

Library functions take a running Ray and never start one. The offline
environment (no model hub, no usage stats) is set here, for the driver and,
through the runtime env, for every worker.
"""

from __future__ import annotations

import os

#: Environment every process of ours runs with: nothing is downloaded at run time.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "TOKENIZERS_PARALLELISM": "false"}


def set_offline_env() -> None:
    """Set :data:`OFFLINE_ENV` in this process (values already set win)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def start_ray(num_cpus: float | None = None, *, address: str | None = None, object_store_memory: int = 200_000_000,
              env: dict[str, str] | None = None, log_to_driver: bool = True, temp_dir: str | None = None,
              worker_niceness: int | None = None) -> bool:
    """Connect to Ray, or start a small local instance; returns whether this call started one.

    Order: an initialised Ray is kept; ``address`` (or ``RAY_ADDRESS``, set inside ``ray job submit``)
    is attached to; otherwise a new local instance starts with ``address="local"``, which never
    attaches to a cluster that ``ray start`` left running on the machine.

    Args:
        num_cpus: logical CPUs of a new local instance (None: all).
        address: a cluster to attach to; ``"local"`` always starts a new local instance.
        object_store_memory: object store bytes of a new local instance.
        env: extra environment variables for every worker (added to :data:`OFFLINE_ENV`).
        log_to_driver: stream worker logs to this process.
        temp_dir: Ray's temp dir for a new local instance.
        worker_niceness: ``RAY_worker_niceness`` (Ray nices workers to 15 by default; a job whose
            main work runs in actors, compared with an in-process loop, sets 0).
    """
    import ray

    set_offline_env()
    if ray.is_initialized():
        return False
    env_vars = {**OFFLINE_ENV, **(env or {})}
    address = address if address is not None else os.environ.get("RAY_ADDRESS")
    if address and address != "local":  # "local": always a new local instance, whatever RAY_ADDRESS says
        ray.init(address=address, runtime_env={"env_vars": env_vars})
        return False
    if worker_niceness is not None:
        os.environ.setdefault("RAY_worker_niceness", str(worker_niceness))
    os.environ.update(env or {})  # the local raylet, and so every worker, inherits the driver's environment
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a loaded machine can miss it
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                     object_store_memory=object_store_memory, _temp_dir=temp_dir,
                     runtime_env={"env_vars": env_vars})
            return True
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"local Ray did not start in time (machine busy?); retrying ({attempt + 1}/2)", flush=True)
            ray.shutdown()
    return True
