"""``mer bench chaos``: every fault scenario in one run, on one test-sized cluster.

The scenarios live per stage: :mod:`~mer_ray.bench.chaos_extract`, :mod:`~mer_ray.bench.chaos_lantern`,
:mod:`~mer_ray.bench.chaos_train`, :mod:`~mer_ray.bench.chaos_serve`; the cluster and the injectors in
:mod:`~mer_ray.bench.chaos_cluster`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mer_ray.bench.chaos_cluster import skipped, start_cluster, stop_cluster
from mer_ray.bench.chaos_extract import run_extract_scenario
from mer_ray.bench.chaos_lantern import run_lantern_scenario
from mer_ray.bench.chaos_train import run_llm_scenario, run_vanilla_scenario

#: Scenario names of ``mer bench chaos`` (the Serve ones come from ``mer_ray.bench.chaos_serve``).
BATCH_SCENARIOS = ("extract_node", "lantern_actor", "train_vanilla_worker", "train_llm_worker")




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
            scenarios["train_llm_worker"] = skipped(f"MELD text not found at {meld_dir} (--meld-dir)")
        for name, fn in runs:
            if only is not None and name not in only:
                continue
            s0 = time.time()
            try:
                scenarios[name] = fn()
            except Exception as e:  # noqa: BLE001 - one scenario failing is a result, the others still run
                scenarios[name] = {**skipped("scenario raised"), "error": f"{type(e).__name__}: {e}"}
            scenarios[name]["scenario_s"] = round(time.time() - s0, 1)
            _check_window(scenarios[name])
    finally:
        stop_cluster(cluster)
    try:
        from mer_ray.bench import chaos_serve
    except ImportError:
        scenarios["serve"] = skipped("mer_ray.bench.chaos_serve is missing")
    else:
        if only is None or any(n.startswith(("serve_", "session")) for n in only):
            serve_dir = work / "serve"
            serve_dir.mkdir(parents=True, exist_ok=True)
            try:
                scenarios.update(chaos_serve.run_serve_scenarios(models_dir, str(serve_dir)))
                for name, rec in scenarios.items():
                    if name.startswith(("serve_", "session")):
                        _check_window(rec)
            except Exception as e:  # noqa: BLE001
                scenarios["serve"] = {**skipped("run_serve_scenarios raised"), "error": f"{type(e).__name__}: {e}"}
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
