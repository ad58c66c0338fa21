"""The chaos kit: a multi-node test cluster on this machine, fault injectors, and id comparison.

The cluster is ``ray.cluster_utils.Cluster``: a head (the driver's node, no CPUs by default, so no work
lands there) and worker nodes with fractional CPUs, so work really spreads over nodes and removing one
loses a share of it. A fault is injected by a thread that polls the run's progress (a fraction in
[0, 1], read from its output files) and strikes once that fraction is in ``[lo, hi]``; it records what it
hit, when, and at what progress. Only local processes are touched.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path


def start_cluster(n_workers: int = 2, worker_cpus: float = 1.0, head_cpus: float = 0.0, object_store_mb: int = 150,
                  connect: bool = True, temp_dir: str | None = None):
    """A head and ``n_workers`` worker nodes on this machine; returns the ``Cluster`` (its ``address`` attaches).

    With ``connect`` this process attaches as the driver through :func:`mer_ray.runtime.start_ray`,
    the same path a job takes with ``RAY_ADDRESS`` or ``--ray-address``.
    """
    from ray.cluster_utils import Cluster

    from mer_ray.runtime import OFFLINE_ENV, set_offline_env, start_ray

    set_offline_env()  # the nodes' raylets, and so every worker, inherit this environment
    os.environ.setdefault("RAY_worker_niceness", "0")
    head = dict(num_cpus=head_cpus, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                env_vars=dict(OFFLINE_ENV))
    if temp_dir:
        head["_temp_dir"] = temp_dir
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(n_workers):
        cluster.add_node(num_cpus=worker_cpus, object_store_memory=object_store_mb * 2**20)
    cluster.wait_for_nodes()
    if connect:
        start_ray(address=cluster.address)
    return cluster


def stop_cluster(cluster) -> None:
    """Disconnect the driver and stop every node of ``cluster``."""
    import ray

    ray.shutdown()
    cluster.shutdown()


def node_pid(node) -> int:
    """The raylet pid of a ``cluster_utils`` node."""
    return node.all_processes["raylet"][0].process.pid


def processes_named(needle: str, under_pid: int | None = None) -> list[int]:
    """Pids of processes whose command line (Ray sets it to ``ray::<actor>``) contains ``needle``,
    optionally only descendants of ``under_pid``."""
    import psutil

    procs = psutil.Process(under_pid).children(recursive=True) if under_pid else psutil.process_iter()
    out = []
    for p in procs:
        try:
            if needle in " ".join(p.cmdline()):
                out.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return sorted(out)


def worker_node_running(cluster, needle: str):
    """A worker node (not the head) that hosts a process matching ``needle``, or None."""
    for node in cluster.worker_nodes:
        if processes_named(needle, node_pid(node)):
            return node
    return None


class Injector(threading.Thread):
    """Strike once while ``progress()`` is in ``[lo, hi]``: ``strike()`` returns ``(target, pid)``.

    ``record`` becomes ``{"target", "pid", "at_s", "progress"}`` (``at_s`` from ``start()``;
    ``progress`` read just before the strike), or stays empty if the run finished first or the
    timeout passed. ``strike`` may return None to mean "not yet" (e.g. no victim up yet).
    """

    def __init__(self, progress: Callable[[], float], strike: Callable[[], tuple[str, int] | None],
                 lo: float = 0.2, hi: float = 0.8, timeout_s: float = 600.0, poll_s: float = 0.05):
        super().__init__(daemon=True)
        self.progress, self.strike, self.lo, self.hi = progress, strike, lo, hi
        self.timeout_s, self.poll_s = timeout_s, poll_s
        self.record: dict = {}
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        t0 = time.time()
        try:
            while not self.stop_flag.is_set() and time.time() - t0 < self.timeout_s:
                p = self.progress()
                if self.lo <= p <= self.hi:
                    hit = self.strike()
                    if hit is not None:
                        self.record = {"target": hit[0], "pid": hit[1], "at_s": round(time.time() - t0, 3), "progress": round(p, 4)}
                        return
                elif p > self.hi:
                    return
                time.sleep(self.poll_s)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e

    def finish(self) -> dict:
        """Stop polling and return the record (raise what the thread raised)."""
        self.stop_flag.set()
        self.join(timeout=5)
        if self.error:
            raise self.error
        return self.record


def kill_pid(pid: int, missing_ok: bool = False) -> None:
    """SIGKILL one process (``missing_ok``: one that has already gone is not an error)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        if not missing_ok:
            raise


def read_progress_file(path: str | Path, key: str = "step") -> dict | None:
    """The JSON a training worker writes after each step (``pid`` and ``step``), or None before the first."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def kill_when_step(pid_file: str | Path, at_step: int, timeout_s: float = 300.0) -> threading.Thread:
    """A started thread that SIGKILLs the pid in ``pid_file`` once its ``step`` reaches ``at_step``.

    The thread's ``killed`` dict holds the file's content at the kill (empty if it never came).
    """
    killed: dict = {}

    def run():
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            info = read_progress_file(pid_file)
            if info and info["step"] >= at_step:
                kill_pid(info["pid"])
                killed.update(info, at_s=round(time.time() - t0, 3))
                return
            time.sleep(0.05)

    t0 = time.time()
    th = threading.Thread(target=run, daemon=True)
    th.killed = killed  # type: ignore[attr-defined]
    th.start()
    return th


class ResumeWatch:
    """After a kill, time until a progress file names another pid (the restarted worker's first step)."""

    def __init__(self, path: str | Path, timeout_s: float = 300.0):
        self.path, self.timeout_s = path, timeout_s
        self.t_kill: float | None = None
        self.t_back: float | None = None

    def start_watch(self, old_pid: int) -> None:
        self.t_kill = time.time()

        def run():
            while time.time() - self.t_kill < self.timeout_s:
                info = read_progress_file(self.path)
                if info and info["pid"] != old_pid:
                    self.t_back = time.time()
                    return
                time.sleep(0.02)

        threading.Thread(target=run, daemon=True).start()

    def seconds(self) -> float | None:
        return round(self.t_back - self.t_kill, 3) if self.t_back and self.t_kill else None


def skipped(reason: str) -> dict:
    """A scenario record for a scenario that did not run (``skipped`` says why), in every record's shape."""
    return {"injected": {}, "expected": None, "observed": None, "lost": None, "duplicated": None, "failed_requests": {},
            "recovery_s": None, "skipped": reason}


def compare_ids(clean: list, observed: list) -> dict:
    """``lost`` (in the clean run, not here), ``duplicated`` (seen more than once here), ``extra`` (never in the clean run)."""
    from collections import Counter

    c = Counter(observed)
    return {"expected": len(clean), "observed": len(observed), "lost": len(set(clean) - set(c)),
            "duplicated": sum(v - 1 for v in c.values() if v > 1), "extra": len(set(c) - set(clean))}
