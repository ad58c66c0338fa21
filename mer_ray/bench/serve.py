"""``mer bench serve``: Ray Serve against the server a user would write by hand, and against the pipeline in process.

One run measures, on the same payloads and the same load generator:

- **Serve**: each Serve YAML given (``--config``, repeatable: a layout each; fixed replica counts, no
  autoscaling), for each torch thread count, over HTTP on 127.0.0.1 at each concurrency level;
- **uvicorn**: the same stages behind a plain FastAPI app in one uvicorn process, no Ray
  (:mod:`mer_ray.bench.serve_uvicorn`), for each torch thread count and worker-pool size;
- **in process**: the same :class:`~mer_ray.serve.ensemble.Ensemble` on local stage objects, one dialogue per call
  at each level, and *batched* (many dialogues per featurizer call) at the top level;
- **the LLM path**: Serve with ``use_llm: true`` at concurrency 4 (a few requests: ~1-3 s each).

Payloads are MELD dev dialogues (``--data-dir``), or the demo corpus's only when ``--payloads generated`` says so.
Nothing is cached between requests. The summary (:mod:`mer_ray.bench.serve_report`) takes each side's fastest
setting. The JSON is rewritten after every setting, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from mer_ray.bench.serve_load import CpuMeter, load_http, load_inprocess, load_inprocess_batched, payloads, stage_cpu_ms
from mer_ray.bench.serve_report import summarize

LLM_PARTS = ("LLMRefiner", "Fusion", "EnsembleFusion")
SHOW = ("rps", "p50_ms", "p99_ms", "errors")


def _show(row: dict) -> None:
    """One readable line per setting."""
    setting = " ".join(f"{k}={row[k]}" for k in ("layout", "torch_threads", "pool") if row.get(k) is not None)
    batch = " ".join(f"{d}:{b['mean']}" for d, b in (row.get("batch") or {}).items() if b and b.get("mean") is not None)
    llm = f" timing_ms={row['timing_ms_mean']}" if row.get("timing_ms_mean") else ""
    print(f"bench serve: {row['mode']:<17} {setting} c={row['concurrency']} llm={row['use_llm']}: "
          + " ".join(f"{k} {row[k]}" for k in SHOW) + (f" batch {batch}" if batch else "") + llm, flush=True)


def _group(cpu: dict[str, float]) -> dict[str, float]:
    """CPU seconds by process (:class:`CpuMeter`) -> by role: a deployment's name, proxy, controller, ray_system."""
    out: dict[str, float] = {}
    for k, v in cpu.items():
        if k == "self":
            g = "load_generator"  # the bench process: client threads, plus the Ray driver's own threads
        elif k.startswith("ray::ServeReplica:"):
            g = k.split()[0].rsplit(":", 1)[1].split(".")[0]  # ray::ServeReplica:mer:Featurizer[.method]
        elif k.startswith("ray::ProxyActor"):
            g = "proxy"
        elif k.startswith("ray::ServeController"):
            g = "controller"
        else:
            g = "ray_system"
        out[g] = round(out.get(g, 0.0) + v, 3)
    return out


def _serve_setup(config, models_dir, threads: int | None, overrides, llm: bool):
    """(ServeConfig, deployment options, app entry) of one Serve setting; the LLM deployments only when ``llm``."""
    from mer_ray.serve.deploy import resolve

    cfg, options, app = resolve(config, [("models_dir", models_dir), *(overrides or []), ("torch_threads", threads)])
    if any("autoscaling_config" in o for o in options.values()):
        raise ValueError(f"{config}: the benchmark needs fixed replica counts (num_replicas), not autoscaling_config")
    if not llm:
        cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"enabled": False})})
        options = {k: v for k, v in options.items() if k not in LLM_PARTS and not k.startswith("FinetunedLLM")}
    if not cfg.use_mllm:
        options.pop("MLLM", None)
    return cfg, options, app


def _batch_stats(app_name: str) -> dict:
    """``batch_stats()`` of every deployment of the app ({calls, items, max}, cumulative); None where it has none."""
    from ray import serve

    out = {}
    for name in serve.status().applications[app_name].deployments:
        try:
            out[name] = serve.get_deployment_handle(name, app_name).batch_stats.remote().result(timeout_s=30)
        except Exception:  # no such method on this deployment (the ingress, a stage without @serve.batch)
            out[name] = None
    return out


def _batch_delta(before: dict, after: dict) -> dict:
    out = {}
    for name, a in after.items():
        b = before.get(name)
        if a is None or b is None:
            out[name] = None
            continue
        calls, items = a["calls"] - b["calls"], a["items"] - b["items"]
        out[name] = {"calls": calls, "items": items, "max": a.get("max"), "mean": round(items / calls, 2) if calls else None}
    return out


def _serve_side(report, save, configs, models_dir, threads, overrides, levels, dialogues, n, warmup, port, n_llm):
    """Every Serve setting (layout x torch threads x level), then the LLM setting; Ray is shut down at the end."""
    import ray
    from ray import serve

    from mer_ray.serve.builder import check_models
    from mer_ray.serve.deploy import check_cpus, deploy

    def fits(cfg, options):  # Serve would wait forever for a replica it cannot place
        check_cpus(cfg, options, ray.cluster_resources().get("CPU", 0.0))

    def measure(url, app_name, c, use_llm, k, w, **setting):
        load_http(url, dialogues, w, min(c, w), use_llm)  # warm-up, not counted
        before = None if use_llm else _batch_stats(app_name)
        meter = CpuMeter()
        meter.start()
        row = load_http(url, dialogues, k, c, use_llm)
        row.update(setting, cpu_s=_group(meter.stop()))
        if before is not None:
            row["batch"] = _batch_delta(before, _batch_stats(app_name))
        report["results"].append(row)
        _show(row)
        save()

    for config in configs:
        for t in threads:
            cfg, options, app = _serve_setup(config, models_dir, t, overrides, llm=False)
            name = app.get("name", "mer")
            fits(cfg, options)
            url = deploy(cfg, options, port=port, name=name, route_prefix=app.get("route_prefix", "/"))
            report["replicas"][str(config)] = {k: v.get("num_replicas") for k, v in options.items()}
            for c in levels:
                measure(url, name, c, False, n, warmup, layout=str(config), torch_threads=t)
            serve.shutdown()
    if n_llm > 0:
        cfg, options, app = _serve_setup(configs[0], models_dir, None, overrides, llm=True)
        missing = check_models(cfg) if cfg.llm.enabled else ["llm.enabled is false in the config"]
        if not missing:
            try:
                fits(cfg, options)
            except ValueError as e:  # e.g. an `mer ensemble` run's LLM members need more CPUs than this Ray has
                missing = [str(e)]
        if missing:
            report["llm"] = {"skipped": f"no LLM setting: {missing}"}
        else:
            name = app.get("name", "mer")
            url = deploy(cfg, options, port=port, name=name, route_prefix=app.get("route_prefix", "/"))
            measure(url, name, 4, True, n_llm, 1, layout=str(configs[0]), torch_threads=cfg.torch_threads)
            r = report["results"][-1]
            report["llm"] = {k: r[k] for k in ("layout", "torch_threads", "concurrency", "requests", "errors", "rps", "p50_ms",
                                                "p99_ms", "timing_ms_mean")} | {"llm_n_threads": cfg.llm.n_threads}
            serve.shutdown()


def _uvicorn_side(report, save, models_dir, threads, pools, levels, dialogues, n, warmup, port):
    """Every uvicorn setting (torch threads x pool x level), each in a fresh server process."""
    from mer_ray.bench.serve_uvicorn import UvicornServer

    for t in threads:
        for pool in pools:
            srv = UvicornServer(models_dir, port, t, pool)
            with srv as url:
                for c in levels:
                    load_http(url, dialogues, warmup, min(c, warmup), False, mode="uvicorn")  # warm-up, not counted
                    meter = CpuMeter(srv.pid, children=False)
                    meter.start()
                    row = load_http(url, dialogues, n, c, False, mode="uvicorn")
                    row.update(torch_threads=t, pool=pool, cpu_s={"uvicorn": round(sum(meter.stop().values()), 3)})
                    report["results"].append(row)
                    _show(row)
                    save()


def _inprocess_side(report, save, models_dir, threads, levels, dialogues, n, warmup, batch):
    from mer_ray.calibration.artifacts import Calibration
    from mer_ray.serve.ensemble import Ensemble
    from mer_ray.serve.ensemble_run import SeedAverageMember, is_ensemble_run
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.serve.members import VanillaMember

    member = SeedAverageMember if is_ensemble_run(models_dir) else VanillaMember  # as the Vanilla deployment picks
    for t in threads:
        feat, van = RequestFeaturizer(t), member(models_dir, t)
        ens = Ensemble.local(feat, van, calibration=Calibration.load(models_dir))  # as the Serve ingress applies it
        if t == 1:  # per-request CPU of each stage, for the paper model (one thread: nothing else runs here now)
            report["stage_cpu_ms"] = stage_cpu_ms(feat, van, dialogues)
        for c in levels:
            load_inprocess(ens, dialogues, warmup, min(c, warmup), False)
            row = load_inprocess(ens, dialogues, n, c, False) | {"torch_threads": t}
            report["results"].append(row)
            _show(row)
            save()
        load_inprocess_batched(ens, feat, van, dialogues, batch, batch)  # warm-up: one group
        row = load_inprocess_batched(ens, feat, van, dialogues, n, batch) | {"torch_threads": t}
        report["results"].append(row)
        _show(row)
        save()


def run_bench(out, models_dir=None, configs=None, n_requests: int = 500, n_llm: int = 12, levels=(1, 4, 16), port: int = 8011,
              data_dir=None, payload_kind: str = "meld", num_cpus=None, warmup: int = 5, overrides: list[str] | None = None,
              threads=(1, 2), pools=(4, 16), batch: int | None = None) -> dict:
    """Run every side's sweep and write the JSON report to ``out``; returns the report.

    Args:
        configs: Serve YAMLs, one layout each (default ``serve/bench.yaml``).
        threads: torch thread counts swept on every side; ``pools``: the uvicorn side's worker-pool sizes.
        batch: dialogues per featurizer call of the batched in-process run (default: the top concurrency level).
    """
    from mer_ray.serve.builder import check_models, require_models
    from mer_ray.serve.deploy import serve_env, start_local_ray

    configs = [str(c) for c in (configs or ["serve/bench.yaml"])]
    levels, batch = list(levels), batch or max(levels)
    dialogues, source = payloads(data_dir, payload_kind)  # before anything slow: a missing MELD dir fails at once
    cfg, _, _ = _serve_setup(configs[0], models_dir, None, overrides, llm=n_llm > 0)
    built_demo_models = False
    if check_models(cfg):
        if models_dir is not None:  # the user named a directory: never train into it behind their back
            require_models(cfg)
        # A leaf may build what it measures: the demo's models (a generated corpus), recorded in the JSON.
        from mer_ray.demo.run import STEPS, run_demo

        print(f"bench serve: no models in {cfg.models_dir}; building the demo models first (recorded in the JSON)")
        run_demo(Path(cfg.models_dir).parent, steps=[(n, f) for n, f in STEPS if n != "serve"])
        built_demo_models = True
    models = str(cfg.models_path.resolve())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = {"command": "mer bench serve", "payloads": "meld_dev" if source.startswith("meld") else "generated",
              "payload_source": source, "n_dialogues": len(dialogues), "models_dir": cfg.models_dir, "built_demo_models": built_demo_models,
              "machine": {"cores": cores, "cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_start": os.getloadavg()},
              "config": configs[0], "layouts": configs, "replicas": {}, "serve_env": serve_env(), "levels": levels,
              "requests_per_setting": n_requests, "thread_settings": {
                  "serve": {"torch_threads": list(threads), "llm_n_threads": cfg.llm.n_threads},
                  "uvicorn": {"torch_threads": list(threads), "pool": list(pools)},
                  "inprocess": {"torch_threads": list(threads), "executor": "asyncio.to_thread (default pool: min(32, cpus + 4))"},
                  "inprocess_batched": {"torch_threads": list(threads), "dialogues_per_call": batch}},
              "results": []}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: bool = True) -> None:
        out.write_text(json.dumps({**report, "partial": partial}, indent=2))

    import ray
    from ray import serve

    start_local_ray(num_cpus=num_cpus)
    try:
        _serve_side(report, save, configs, models, threads, overrides, levels, dialogues, n_requests, warmup, port, n_llm)
    finally:  # the other sides run without Ray: nothing of it left on the cores
        serve.shutdown()
        ray.shutdown()
    _uvicorn_side(report, save, models, threads, pools, levels, dialogues, n_requests, warmup, port + 1)
    _inprocess_side(report, save, models, threads, levels, dialogues, n_requests, warmup, batch)
    report.update(summarize(report, levels))
    for side, best in report["fastest"].items():
        if best and side in report["thread_settings"]:
            report["thread_settings"][side]["fastest"] = {k: v for k, v in best.items() if k in ("layout", "torch_threads", "pool")}
    save(False)
    return report
