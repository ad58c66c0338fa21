"""``mer bench extract``: the Ray pipeline against a plain single-process loop over the same encoders.

Three timings over one generated set of clips, each in a fresh subprocess so thread
settings cannot leak between them:
1. the Ray pipeline (``run_extract`` on a local Ray with every core);
2. a plain loop (:func:`run_local`) with the libraries' default thread settings;
3. the same loop with every library limited to one thread.
Wall times include model loading in all three (a user pays it every run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                  "NUMEXPR_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_clips(work: Path, n: int, seconds: float, fps: int, width: int) -> Path:
    """``n`` clips with a face and a voice; returns a Parquet manifest (media root: ``work``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mer_ray.demo import media as sm

    rows = []
    for i in range(n):
        rel = f"clips/u{i:04d}.mp4"
        if not (work / rel).exists():
            sm.clip(work / rel, seconds=seconds, fps=fps, width=width, height=width * 3 // 4, f0=120 + 7 * (i % 20), seed=i)
        rows.append(dict(dialogue_id=f"b{i // 10:03d}", turn=i % 10, speaker="A", text=f"benchmark utterance number {i}",
                         video=rel))
    path = work / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def thread_settings() -> dict:
    """The thread settings this process ended up with."""
    import cv2
    import torch

    return {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
            "opencv": cv2.getNumThreads(), "env": {k: os.environ.get(k) for k in ONE_THREAD_ENV}}


def _child(mode: str, manifest: str, work: str) -> dict:
    """One timing, run inside a subprocess."""
    from mer_ray.features.config import ExtractConfig

    cfg = ExtractConfig()
    if mode == "ray":
        import ray

        from mer_ray.features.job import run_extract
        from mer_ray.runtime import start_ray

        start_ray(os.cpu_count(), object_store_memory=cfg.object_store_mb * 2**20, log_to_driver=False)
        out = Path(work) / f"ray-out-{time.time_ns()}"
        t0 = time.perf_counter()
        summary = run_extract(manifest, out, media_root=work, config=cfg, progress=False)
        wall = time.perf_counter() - t0
        ray.shutdown()
        return {"wall_seconds": wall, "stage_seconds": summary["stage_seconds"], "status": summary["status"],
                "threads": {"per_actor": cfg.threads, "fused": cfg.fuse,
                            "pools": ({"fused": cfg.fused.model_dump()} if cfg.fuse else
                                      {k: getattr(cfg, k).model_dump() for k in ("decode", "face", "expression", "audio", "text_stage")})}}
    from mer_ray.features.local import run_local

    threads = None if mode == "loop_default" else 1
    timings, loads = Counter(), Counter()
    t0 = time.perf_counter()
    table = run_local(manifest, work, cfg, threads=threads, timings=timings, load_timings=loads)
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "stage_seconds": dict(timings), "load_seconds": dict(loads),
            "status": dict(Counter(table.column("status").to_pylist())), "threads": thread_settings()}


def _run_child(mode: str, manifest: Path, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ONE_THREAD_ENV and k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    if mode == "loop_one_thread":
        env.update(ONE_THREAD_ENV)
    res = subprocess.run([sys.executable, "-m", "mer_ray.bench.extract", mode, str(manifest), str(work)],
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"bench {mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_bench(n_utterances: int = 60, seconds: float = 3.0, fps: int = 10, width: int = 320,
              work_dir: Path | None = None) -> dict:
    """Generate the clips, time the three runs, and return the report dict."""
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="mer-bench-extract-"))
    work.mkdir(parents=True, exist_ok=True)
    manifest = make_clips(work, n_utterances, seconds, fps, width)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    runs = {mode: _run_child(mode, manifest, work) for mode in ("ray", "loop_default", "loop_one_thread")}
    ups = {mode: n_utterances / r["wall_seconds"] for mode, r in runs.items()}
    return {
        "speedup": ups["ray"] / ups["loop_default"],
        "efficiency": ups["ray"] / (ups["loop_one_thread"] * cores),
        "utterances_per_second": ups,
        "cores": cores,
        "clips": {"n": n_utterances, "seconds": seconds, "fps": fps, "width": width, "face": True, "audio": True},
        "runs": runs,
        "note": "wall times include model loading and, for ray, actor start-up (ray.init excluded)",
        "load_average": os.getloadavg(),
    }


if __name__ == "__main__":
    print(json.dumps(_child(*sys.argv[1:4])))
