"""Fault injection on a multi-node test cluster: the cluster, the killers, and ``mer bench chaos``.

The cluster is ``ray.cluster_utils.Cluster`` on this machine: a head (the driver's node, no CPUs by
default, so no work lands there) and worker nodes with fractional CPUs, so work really spreads over
nodes and removing one loses a share of it. A fault is injected by a thread that polls the run's
progress (a fraction in [0, 1], read from its output files) and strikes once that fraction is in
``[lo, hi]``; it records what it hit, when, and at what progress. Only local processes are touched.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

#: Scenario names of ``mer bench chaos`` (the Serve ones come from ``mer_ray.bench.chaos_serve``).
BATCH_SCENARIOS = ("extract_node", "lantern_actor", "train_vanilla_worker", "train_llm_worker")


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


def kill_pid(pid: int) -> None:
    """SIGKILL one process."""
    os.kill(pid, signal.SIGKILL)


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


def compare_ids(clean: list, observed: list) -> dict:
    """``lost`` (in the clean run, not here), ``duplicated`` (seen more than once here), ``extra`` (never in the clean run)."""
    from collections import Counter

    c = Counter(observed)
    return {"expected": len(clean), "observed": len(observed), "lost": len(set(clean) - set(c)),
            "duplicated": sum(v - 1 for v in c.values() if v > 1), "extra": len(set(c) - set(clean))}


# ---------------------------------------------------------------- extraction: lose a worker node

#: Feature-store columns compared exactly between a clean run and a run that lost a node. Every stage
#: maps whole units (one block of ``batch_rows`` rows, fixed before the run), so a retried batch holds
#: the same rows in the same order as the first try, on the same CPU model, with ``threads: 1``:
#: the same ops in the same order, bit for bit. No column needs a tolerance (an empty dict).
EXTRACT_TOLERANCE: dict[str, float] = {}

#: Small configs for the test cluster (2 worker nodes of 1 CPU): each layout's pools fit on the one
#: node left after a node is removed, so every restarted actor can be placed (on a real cluster the
#: autoscaler replaces the node instead).
EXTRACT_LAYOUTS = {
    "fused": {"fuse": True, "fused": {"num_cpus": 0.4, "pool_size": 2}},
    "per_stage": {"fuse": False, **{k: {"num_cpus": 0.15, "pool_size": 1}
                                     for k in ("decode", "face", "expression", "audio", "text_stage")}},
}


def make_extract_media(root: str | Path, n_rows: int = 40) -> Path:
    """A manifest of ``n_rows`` utterances over a few real clips (face, no face, voice only, a span of a
    longer clip, a corrupt file): every status case, so retried rows of each kind are compared."""
    from mer_ray.demo import media as sm

    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    sm.clip(root / "clips/face.mp4", seconds=1.5, seed=1)
    sm.clip(root / "clips/noface.mp4", seconds=1.5, face=False, seed=2)
    sm.write_media(root / "clips/voice.wav", audio=sm.voice(1.2, seed=4))
    sm.clip(root / "clips/long.mp4", seconds=4.0, seed=6)
    (root / "clips/corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 4000)
    kinds = [dict(video="clips/face.mp4"), dict(video="clips/noface.mp4"), dict(audio="clips/voice.wav"),
             dict(video="clips/long.mp4", start=1.0, end=2.5), dict(video="clips/corrupt.mp4"), dict()]
    rows = []
    for i in range(n_rows):
        row = dict(dialogue_id=f"d{i // 5}", turn=i % 5, speaker="AB"[i % 2], text=f"utterance number {i} of the chaos set",
                   video=None, start=None, end=None, audio=None)
        row.update(kinds[i % len(kinds)])
        rows.append(row)
    path = root / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _store(out_dir):
    import pyarrow.dataset as pds

    return pds.dataset(str(out_dir), format="parquet").to_table().sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])


def _max_abs_diff(xs: list, ys: list) -> float:
    """Largest |x - y| over two columns of numbers or number lists (inf where only one is null or they are not numbers)."""
    import numpy as np

    worst = 0.0
    for x, y in zip(xs, ys):
        if x is None or y is None:
            worst = worst if x is None and y is None else float("inf")
            continue
        try:
            d = np.abs(np.asarray(x, float) - np.asarray(y, float))
        except (TypeError, ValueError):
            return float("inf")
        if d.shape and d.size:
            worst = max(worst, float(np.nanmax(d)))
        elif not d.shape:
            worst = max(worst, float(d))
    return worst


def compare_stores(clean_dir, observed_dir, tolerance: dict[str, float] | None = None) -> dict:
    """Ids (``dialogue_id/turn``) and every column of two feature stores: ``lost``, ``duplicated``, and per column
    ``exact`` or the largest absolute difference (``mismatched`` lists columns over their tolerance)."""

    tolerance = EXTRACT_TOLERANCE if tolerance is None else tolerance
    a, b = _store(clean_dir), _store(observed_dir)
    ida = [f"{d}/{t}" for d, t in zip(a["dialogue_id"].to_pylist(), a["turn"].to_pylist())]
    idb = [f"{d}/{t}" for d, t in zip(b["dialogue_id"].to_pylist(), b["turn"].to_pylist())]
    out = compare_ids(ida, idb)
    cols, mismatched = {}, []
    if ida == idb:
        for name in a.column_names:
            if a[name].equals(b[name]):
                cols[name] = "exact"
                continue
            diff = _max_abs_diff(a[name].to_pylist(), b[name].to_pylist())
            cols[name] = diff
            if diff > tolerance.get(name, 0.0):
                mismatched.append(name)
    else:
        mismatched.append("ids")
    out.update(columns=cols, mismatched=mismatched)
    return out


def extract_progress(out_dir: str | Path, n_shards: int) -> Callable[[], float]:
    """Fraction of shards on disk (each shard is written atomically once all its rows are in)."""
    return lambda: len(list(Path(out_dir).glob("part-*.parquet"))) / n_shards


def _recovery_s(out_dir, kill_wall: float, summary: dict) -> float | None:
    """Seconds from the kill to the first shard written by the run's last attempt (work flowing again)."""
    starts = (summary.get("retried") or {}).get("attempt_started_at") or [kill_wall]
    since = max(kill_wall, starts[-1])
    after = [p.stat().st_mtime - kill_wall for p in Path(out_dir).glob("part-*.parquet") if p.stat().st_mtime > since]
    return round(min(after), 3) if after else None


def run_extract_scenario(cluster, work_dir: str | Path, layout: str = "fused", clean_dir: str | Path | None = None,
                         n_rows: int = 40, restore: bool = True) -> dict:
    """``mer extract`` on ``cluster`` while a worker node hosting a stage actor is removed at 20-80% of shards.

    A clean run (``clean_dir``, made here when None or absent) gives the ids and values to compare with.
    With ``restore`` a fresh worker node replaces the removed one afterwards (for the next scenario).
    Returns the scenario record of ``mer bench chaos`` plus ``summary`` (the run's) and ``compare``.
    """
    from mer_ray.features.job import run_extract

    work_dir = Path(work_dir)
    manifest = work_dir / "media" / "manifest.jsonl"
    if not manifest.exists():
        make_extract_media(manifest.parent, n_rows)
    base = {"batch_rows": 2, "shard_size": 2, "n_frames": 4, "max_width": 160}
    if clean_dir is None:
        clean_dir = work_dir / "clean"
    if not (Path(clean_dir) / "_summary.json").exists():
        run_extract(manifest, clean_dir, config={**base, **EXTRACT_LAYOUTS["fused"]}, progress=False)
    out = work_dir / f"chaos_{layout}"
    n_shards = -(-n_rows // base["shard_size"])
    removed: dict = {}

    def strike():
        node = worker_node_running(cluster, "MapWorker(MapBatches(")
        if node is None:
            return None
        removed["node"], removed["wall"] = node, time.time()
        pid = node_pid(node)
        cluster.remove_node(node, allow_graceful=False)
        return f"worker node (raylet pid {pid}) hosting a stage actor", pid

    inj = Injector(extract_progress(out, n_shards), strike)
    inj.start()
    t0 = time.time()
    summary = run_extract(manifest, out, config={**base, **EXTRACT_LAYOUTS[layout]}, progress=False)
    wall = time.time() - t0
    injected = inj.finish()
    if restore and removed:
        cluster.add_node(num_cpus=1.0, object_store_memory=150 * 2**20)
        cluster.wait_for_nodes()
    cmp = compare_stores(clean_dir, out)
    return {"injected": injected, "expected": cmp["expected"], "observed": cmp["observed"], "lost": cmp["lost"],
            "duplicated": cmp["duplicated"], "failed_requests": {},
            "recovery_s": _recovery_s(out, removed["wall"], summary) if removed else None,
            "recovery_note": "from the node's removal to the first shard written by the last attempt", "wall_s": round(wall, 2),
            "layout": layout, "retried": summary.get("retried"), "status": summary["status"],
            "columns_exact": sorted(k for k, v in cmp["columns"].items() if v == "exact"),
            "columns_diff": {k: v for k, v in cmp["columns"].items() if v != "exact"}, "mismatched": cmp["mismatched"],
            "tolerance": EXTRACT_TOLERANCE}


# ---------------------------------------------------------------- training: kill a Ray Train worker

#: Dev metrics compared exactly between an uninterrupted run and a killed-and-resumed one. Resuming
#: restores weights, optimiser and scheduler from the last epoch checkpoint; each epoch reseeds torch
#: (dropout) and numpy (the batch order) from ``seed * 1000 + epoch``, so the redone epoch sees the same
#: batches in the same order through the same float ops (one thread, same CPU): bit for bit.
VANILLA_METRICS = ("train_loss", "dev_weighted_f1", "dev_accuracy", "dev_macro_f1")


def _vanilla_store(work_dir: Path, n_dialogues: int) -> Path:
    from mer_ray.demo.corpus import make_corpus
    from mer_ray.features.job import run_extract

    store = work_dir / "features"
    if not (store / "_summary.json").exists():
        manifest = make_corpus(work_dir / "corpus", n_dialogues=n_dialogues, seed=1)
        run_extract(manifest, store, config={"media": False}, progress=False)
    return store


def _last_weights(run_dir: Path) -> dict:
    import torch

    from mer_ray.vanilla import artifacts

    states = artifacts.checkpoint_states(run_dir)
    last = max(states, key=lambda t: t[1]["epoch"])[0]
    return torch.load(last / artifacts.MODEL_FILE)


def run_vanilla_scenario(work_dir: str | Path, epochs: int = 6, n_dialogues: int = 60) -> dict:
    """Train the vanilla model twice on Ray Train (attached cluster): clean, then with its worker SIGKILLed
    mid-epoch (epoch 3 or later of 6, between 20% and 80% of all steps), ``max_failures=2``.

    ``lost``/``duplicated`` count epochs (the ids) of the final history against the clean run's; the
    comparison of dev metrics per epoch and of the final weights is in ``metrics_equal``/``weights_equal``.
    """
    import torch

    from mer_ray.vanilla.model import VanillaConfig
    from mer_ray.vanilla.train import TrainConfig, fit

    work_dir = Path(work_dir)
    store = _vanilla_store(work_dir, n_dialogues)
    cfg = TrainConfig(model=VanillaConfig(encoder="frozen", hidden=16), epochs=epochs, batch_utterances=8, num_threads=1)
    t0 = time.time()
    clean = fit(cfg, store, work_dir / "ray_train", "clean")
    clean_s = time.time() - t0
    prog = work_dir / "progress.json"
    prog.unlink(missing_ok=True)

    def progress() -> float:
        info = read_progress_file(prog)
        return info["step"] / info["total_steps"] if info else 0.0

    def strike():
        info = read_progress_file(prog)
        # mid-epoch (second half), three epochs after the first checkpoint: Ray Train registers a reported
        # checkpoint asynchronously, and kills 0.2 s after epoch 0's report (epochs take ~0.35 s here)
        # were seen to restart from scratch
        if not info or info["epoch"] < 3 or not info["n_batches"] // 2 <= info["batch"] < info["n_batches"] - 1:
            return None
        kill_pid(info["pid"])
        back.start_watch(info["pid"])
        return f"Ray Train worker (epoch {info['epoch']}, batch {info['batch']}/{info['n_batches']})", info["pid"]

    back = ResumeWatch(prog)
    inj = Injector(progress, strike, poll_s=0.01)
    inj.start()
    t0 = time.time()
    res = fit(cfg.model_copy(update={"progress_file": str(prog)}), store, work_dir / "ray_train", "chaos", max_failures=2)
    wall = time.time() - t0
    injected = inj.finish()
    ids = compare_ids([h["epoch"] for h in clean["history"]], [h["epoch"] for h in res["history"]])
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(clean["history"], res["history"])) for k in VANILLA_METRICS}
    wa, wb = _last_weights(work_dir / "ray_train" / "clean"), _last_weights(work_dir / "ray_train" / "chaos")
    resumed = [h["epoch"] for h in res["history"] if h["resumed_run"]]
    return {"injected": injected, **{k: ids[k] for k in ("expected", "observed", "lost", "duplicated")}, "failed_requests": {},
            "recovery_s": back.seconds(), "recovery_note": "from the kill to the first step of the restarted worker",
            "extra_wall_s": round(wall - clean_s, 3),
            "resumed_epochs": resumed, "metric_diff": diffs, "metrics_equal": all(v == 0 for v in diffs.values()),
            "weights_equal": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa),
            "dev_weighted_f1": {"clean": clean["history"][-1]["dev_weighted_f1"], "observed": res["history"][-1]["dev_weighted_f1"]},
            "wall_s": round(wall, 2), "clean_wall_s": round(clean_s, 2), "tolerance": 0.0}


# ---------------------------------------------------------------- Lantern: kill an LLM actor

LANTERN_LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
LANTERN_BACKEND = {"kind": "llama_cpp", "model": "gemma3-270m", "n_threads": 1, "n_ctx": 1024}


def lantern_queries(n_dialogues: int = 4, seed: int = 0):
    """Queries of ``n_dialogues`` synthetic dialogues (vanilla probabilities drawn at random), with their
    prompts for the packaged Gemma 3 270M, plus the content-free query."""
    import numpy as np
    import pyarrow as pa

    from mer_ray.demo.corpus import make_rows
    from mer_ray.lantern.queries import build_queries, with_content_free
    from mer_ray.llm.backends import prompt_format_for
    from mer_ray.llm.prompts import PromptTemplate

    rows = [r for r in make_rows(n_dialogues, seed=seed)]
    probs = np.random.default_rng(seed).dirichlet(np.ones(7), len(rows)).astype(np.float32)
    van = pa.table({"dialogue_id": [r["dialogue_id"] for r in rows], "turn": [r["turn"] for r in rows],
                    "speaker": [r["speaker"] for r in rows], "text": [r["text"] for r in rows], "split": [r["split"] for r in rows],
                    "emotion_probs": pa.array(list(probs), pa.list_(pa.float32()))})
    van = van.replace_schema_metadata({"emotion_labels": json.dumps(LANTERN_LABELS)})
    chat, bos, eos = prompt_format_for(LANTERN_BACKEND)
    tpl = PromptTemplate.load()
    q = build_queries(van, tpl, [2], stride=2, chat_template=chat, bos_token=bos, eos_token=eos)
    return with_content_free(q, tpl, LANTERN_LABELS, chat, bos, eos), tpl.labels(LANTERN_LABELS, chat is not None)


def _raw_part_ids(out_dir: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [q for f in sorted((out_dir / "parts").glob("*.parquet")) for q in pq.read_table(f, columns=["query_id"])["query_id"].to_pylist()]


def run_lantern_scenario(work_dir: str | Path, n_dialogues: int = 4, num_actors: int = 2) -> dict:
    """The Lantern prompt job twice on the attached cluster (clean; then one LLM actor SIGKILLed at 20-80% of
    the queries). Ids and label log-probs are compared with the clean run's (``exact`` or the largest difference)."""
    import numpy as np

    from mer_ray.lantern.job import read_results, run_prompt_job

    work_dir = Path(work_dir)
    queries, labels = lantern_queries(n_dialogues)
    kw = dict(backend=LANTERN_BACKEND, labels=labels, num_actors=num_actors, cpus_per_actor=0.5, max_group=2, progress=False)
    t0 = time.time()
    clean_sum = run_prompt_job(queries, work_dir / "clean", **kw)
    clean_s = time.time() - t0
    out = work_dir / "chaos"
    n = queries.num_rows
    killed: dict = {}

    def progress() -> float:
        parts = out / "parts"
        return len(_raw_part_ids(out)) / n if parts.exists() else 0.0

    def strike():
        pids = processes_named("MapBatches(ScorerWorker)")
        if not pids:
            return None
        kill_pid(pids[0])
        killed["wall"], killed["done"] = time.time(), len(_raw_part_ids(out))
        return "Lantern LLM actor (ScorerWorker)", pids[0]

    inj = Injector(progress, strike)
    inj.start()
    t0 = time.time()
    summary = run_prompt_job(queries, out, **kw)
    wall = time.time() - t0
    injected = inj.finish()
    clean, got = read_results(work_dir / "clean"), read_results(out)
    raw = _raw_part_ids(out)
    ids = compare_ids(clean["query_id"].to_pylist(), raw)  # raw parts: a query scored twice would show here
    a = {q: lp for q, lp in zip(clean["query_id"].to_pylist(), clean["llm_logprobs"].to_pylist())}
    b = {q: lp for q, lp in zip(got["query_id"].to_pylist(), got["llm_logprobs"].to_pylist())}
    sa = dict(zip(clean["query_id"].to_pylist(), clean["status"].to_pylist()))
    sb = dict(zip(got["query_id"].to_pylist(), got["status"].to_pylist()))
    diff = 0.0
    for q in a:
        if a[q] is not None and b.get(q) is not None:
            diff = max(diff, float(np.max(np.abs(np.asarray(a[q]) - np.asarray(b[q])))))
    after = [f.stat().st_mtime - killed["wall"] for f in (out / "parts").glob("*.parquet") if killed and f.stat().st_mtime > killed["wall"]]
    return {"injected": injected, **{k: ids[k] for k in ("expected", "observed", "lost", "duplicated")}, "failed_requests": {},
            "recovery_s": round(min(after), 3) if after else None, "recovery_note": "from the kill to the next result part written",
            "status_equal": sa == sb, "ok": summary["ok"], "failed": summary["failed"], "missing": summary["missing"],
            "clean_summary": {k: clean_sum[k] for k in ("queries", "ok", "failed", "missing")},
            "max_abs_logprob_diff": diff, "logprobs_exact": all(a[q] == b.get(q) for q in a), "retried": summary["retried"],
            "wall_s": round(wall, 2), "clean_wall_s": round(clean_s, 2), "tolerance": 0.0}


# ---------------------------------------------------------------- LLM fine-tuning: kill a rank

def run_llm_scenario(work_dir: str | Path, meld_dir: str | Path, max_steps: int = 8,
                     config: str | Path = "jobs/finetune_cpu.yaml") -> dict:
    """The tiny Gemma-3-shaped LM fine-tuned with DeepSpeed ZeRO-3 over 2 Ray Train workers (gloo), clean and
    with rank 0 SIGKILLed between 20% and 80% of the steps (``max_failures=1``, checkpoints every 2 steps).

    ``lost``/``duplicated`` compare the steps (ids) of the two runs' final step; ``prob_diff`` is the largest
    difference of the final models' label probabilities on three dialogues.
    """
    import numpy as np

    from mer_ray.config import load
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.mllm.predict import MLLMPredictor
    from mer_ray.mllm.tiny import build_tiny_lm
    from mer_ray.mllm.train import run_finetune

    work_dir = Path(work_dir)
    base = build_tiny_lm(work_dir / "tiny" / "gemma3")
    cfg_file = Path(config)  # a shipped finetune config (default relative to the repository root)
    pid_file = work_dir / "pid.json"

    def cfg(name: str, extra: list[str]) -> FinetuneConfig:
        return load(FinetuneConfig, cfg_file, [
            f"model.base={base}", f"data.meld_dir={meld_dir}", "data.max_dialogues={train: 3}", "deepspeed=zero3_cpu.json",
            f"train.max_steps={max_steps}", "train.checkpoint_every=2", "train.warmup_steps=0", "train.min_step_seconds=0.7",
            "ray.num_workers=2", "ray.cpus_per_worker=1", f"ray.name={name}", f"ray.storage_path={work_dir / 'ray_results'}",
            f"out={work_dir / name}", *extra])

    t0 = time.time()
    clean = run_finetune(cfg("clean", ["ray.max_failures=0"]))
    clean_s = time.time() - t0
    back = ResumeWatch(pid_file)

    def progress() -> float:
        info = read_progress_file(pid_file)
        return info["step"] / max_steps if info else 0.0

    def strike():
        info = read_progress_file(pid_file)
        if not info:
            return None
        kill_pid(info["pid"])
        back.start_watch(info["pid"])
        return f"Ray Train rank 0 (step {info['step']}/{max_steps})", info["pid"]

    inj = Injector(progress, strike, lo=0.25, hi=0.75)
    inj.start()
    t0 = time.time()
    res = run_finetune(cfg("chaos", ["ray.max_failures=1", f"train.pid_file={pid_file}"]))
    wall = time.time() - t0
    injected = inj.finish()
    dialogues = [[{"speaker": "A", "text": "I can't believe it!"}, {"speaker": "B", "text": "so what"}],
                 [{"speaker": "A", "text": "okay"}], [{"speaker": "B", "text": "get out of here"}, {"speaker": "A", "text": "fine"}]]
    pa_, pb = MLLMPredictor.from_dir(work_dir / "clean"), MLLMPredictor.from_dir(work_dir / "chaos")
    diff = max(float(np.max(np.abs(pa_.predict_dialogue(d)["emotion_probs"] - pb.predict_dialogue(d)["emotion_probs"]))) for d in dialogues)
    m, mc = res["metrics"], clean["metrics"]
    ids = compare_ids(list(range(1, mc["step"] + 1)), list(range(1, m["step"] + 1)))
    return {"injected": injected, **{k: ids[k] for k in ("expected", "observed", "lost", "duplicated")}, "failed_requests": {},
            "recovery_s": back.seconds(), "recovery_note": "from the kill to the first step reported by the restarted rank 0",
            "resumed_from": m.get("resumed_from"), "final_loss": {"clean": mc["loss"], "observed": m["loss"]},
            "loss_diff": abs(mc["loss"] - m["loss"]), "prob_diff": diff, "wall_s": round(wall, 2), "clean_wall_s": round(clean_s, 2)}


# ---------------------------------------------------------------- mer bench chaos

def _missing(reason: str) -> dict:
    return {"injected": {}, "expected": None, "observed": None, "lost": None, "duplicated": None, "failed_requests": {},
            "recovery_s": None, "skipped": reason}


def run_bench(out: str | Path, work_dir: str | Path | None = None, meld_dir: str | Path | None = None,
              models_dir: str | None = None, only: list[str] | None = None) -> dict:
    """Every scenario in one run on one test cluster (a head and two 1-CPU worker nodes); writes ``out`` (JSON).

    Serve scenarios come from ``mer_ray.bench.chaos_serve.run_serve_scenarios(models_dir, out_dir)`` when that
    module exists (recorded as missing otherwise); it runs after the batch scenarios' cluster is stopped,
    since it brings up its own Serve instance. ``only`` limits the run to some scenario names.
    """
    import tempfile

    out = Path(out)
    tmp = tempfile.TemporaryDirectory(prefix="mer-chaos-") if work_dir is None else None
    work = Path(work_dir or tmp.name)
    scenarios: dict[str, dict] = {}
    t0 = time.time()
    cluster = start_cluster(n_workers=2, worker_cpus=1.0, head_cpus=0.0)
    try:
        runs = [("extract_node", lambda: _extract_both(cluster, work / "extract")),
                ("lantern_actor", lambda: run_lantern_scenario(work / "lantern")),
                ("train_vanilla_worker", lambda: run_vanilla_scenario(work / "vanilla"))]
        if meld_dir and (Path(meld_dir) / "train_sent_emo.csv").exists():
            runs.append(("train_llm_worker", lambda: run_llm_scenario(work / "llm", meld_dir)))
        else:
            scenarios["train_llm_worker"] = _missing(f"MELD text not found at {meld_dir} (--meld-dir)")
        for name, fn in runs:
            if only is not None and name not in only:
                continue
            s0 = time.time()
            try:
                scenarios[name] = fn()
            except Exception as e:  # noqa: BLE001 - one scenario failing is a result, the others still run
                scenarios[name] = {**_missing("scenario raised"), "error": f"{type(e).__name__}: {e}"}
            scenarios[name]["scenario_s"] = round(time.time() - s0, 1)
            _check_window(scenarios[name])
    finally:
        stop_cluster(cluster)
    try:
        from mer_ray.bench import chaos_serve
    except ImportError:
        scenarios["serve"] = _missing("mer_ray.bench.chaos_serve is missing")
    else:
        if only is None or any(n.startswith(("serve_", "session")) for n in only):
            serve_dir = work / "serve"
            serve_dir.mkdir(parents=True, exist_ok=True)
            try:
                scenarios.update(chaos_serve.run_serve_scenarios(models_dir, str(serve_dir)))
            except Exception as e:  # noqa: BLE001
                scenarios["serve"] = {**_missing("run_serve_scenarios raised"), "error": f"{type(e).__name__}: {e}"}
    result = {"scenarios": scenarios, "wall_s": round(time.time() - t0, 1),
              "cluster": {"head_cpus": 0.0, "worker_nodes": 2, "worker_cpus": 1.0}, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    if tmp:
        tmp.cleanup()
    return result


def _extract_both(cluster, work: Path) -> dict:
    """``extract_node``: the fused layout's record, with the per-stage layout's under ``per_stage``; ``lost`` and
    ``duplicated`` summed over both."""
    fused = run_extract_scenario(cluster, work, "fused")
    per_stage = run_extract_scenario(cluster, work, "per_stage")
    return {**fused, "lost": fused["lost"] + per_stage["lost"], "duplicated": fused["duplicated"] + per_stage["duplicated"],
            "per_stage": per_stage}


def _check_window(rec: dict, lo: float = 0.2, hi: float = 0.8) -> None:
    """Record whether the kill landed between ``lo`` and ``hi`` of the run's progress."""
    p = (rec.get("injected") or {}).get("progress")
    rec["kill_in_window"] = p is not None and lo <= p <= hi
