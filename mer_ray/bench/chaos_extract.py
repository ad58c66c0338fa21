"""``extract_node``: remove a worker node of the test cluster while ``mer extract`` runs (both layouts)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from mer_ray.bench.chaos_cluster import Injector, compare_ids, node_pid, worker_node_running

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
    """``mer extract`` on ``cluster`` while a worker node hosting a stage actor is removed mid-run.

    Progress is time: the run's elapsed seconds over a clean run's of the same layout, and the node goes at
    50-80% of that. Shards on disk were the first measure, but in the per-stage layout they land in a burst
    at the end (the first 20% of shards were seen 1 s before the run ended), so a removal there could hit a
    node with no unfinished work and prove nothing; the shard fraction at the strike is still recorded.

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
    timed = Path(clean_dir) if layout == "fused" else work_dir / f"clean_{layout}"  # the clean run of this layout
    if not (timed / "_summary.json").exists():
        run_extract(manifest, timed, config={**base, **EXTRACT_LAYOUTS[layout]}, progress=False)
    clean_wall = json.loads((timed / "_summary.json").read_text())["seconds"]
    out = work_dir / f"chaos_{layout}"
    n_shards = -(-n_rows // base["shard_size"])
    on_disk = extract_progress(out, n_shards)
    removed: dict = {}
    t_start: list[float] = []

    def strike():
        node = worker_node_running(cluster, "MapWorker(MapBatches(")
        if node is None:
            return None
        removed["node"], removed["wall"], removed["shards"] = node, time.time(), round(on_disk(), 3)
        pid = node_pid(node)
        cluster.remove_node(node, allow_graceful=False)
        return f"worker node (raylet pid {pid}) hosting a stage actor", pid

    inj = Injector(lambda: (time.time() - t_start[0]) / clean_wall if t_start else 0.0, strike, lo=0.5, hi=0.8)
    t_start.append(time.time())
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
            "progress_measure": f"elapsed / the clean {layout} run's {clean_wall} s", "shards_on_disk_at_strike": removed.get("shards"),
            "columns_exact": sorted(k for k, v in cmp["columns"].items() if v == "exact"),
            "columns_diff": {k: v for k, v in cmp["columns"].items() if v != "exact"}, "mismatched": cmp["mismatched"],
            "tolerance": EXTRACT_TOLERANCE}

