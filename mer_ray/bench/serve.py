"""``mer bench serve``: a bounded load on 127.0.0.1 against the same pipeline run in process.

Replica counts are fixed (``serve/bench.yaml``: ``num_replicas``, no autoscaling)
and nothing is cached between requests. Payloads are MELD dev dialogues when
``--data-dir`` (or ``MER_MELD_DIR``) names a MELD directory, otherwise generated dialogues. Each setting
records requests per second, p50/p99 latency and errors; the in-process run
calls :class:`~mer_ray.serve.ensemble.Ensemble` on the same stage objects at
the same concurrency (validation and response model included), so Serve's
overhead is the ratio ``serve_over_inprocess`` (throughput at concurrency 16,
without the LLM).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np


def payloads(data_dir: Path | None, max_turns: int = 24) -> tuple[list[list[dict]], str]:
    """Dialogues as lists of ``{"speaker", "text"}`` (each cut to ``max_turns``), and where they came from."""
    data_dir = data_dir or os.environ.get("MER_MELD_DIR")
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and (data_dir / "dev_sent_emo.csv").exists():
        from mer_ray.data.loaders import load_meld

        t = load_meld(data_dir, "dev").select(["dialogue_id", "speaker", "text"]).to_pylist()
        out: dict[str, list] = {}
        for r in t:
            out.setdefault(r["dialogue_id"], []).append({"speaker": r["speaker"] or "", "text": (r["text"] or "")[:2000]})
        return [d[:max_turns] for d in out.values()], f"MELD dev ({data_dir})"
    from mer_ray.demo.corpus import make_rows

    out = {}
    for r in make_rows(n_dialogues=100, seed=0):
        out.setdefault(r["dialogue_id"], []).append({"speaker": r["speaker"], "text": r["text"]})
    return [d[:max_turns] for d in out.values()], "generated dialogues (mer_ray.demo.corpus)"


def _stats(lat: list[float], errors: int, wall: float, **kw) -> dict:
    a = np.asarray(lat) * 1e3 if lat else np.zeros(1)
    return {**kw, "requests": len(lat) + errors, "errors": errors, "wall_s": round(wall, 3),
            "rps": round(len(lat) / wall, 3) if wall > 0 else 0.0, "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2)}


def load_http(url: str, dialogues, n: int, concurrency: int, use_llm: bool) -> dict:
    """``n`` POSTs from ``concurrency`` client threads, request ``i`` carrying dialogue ``i % len``."""
    import httpx

    lat: list[float] = []
    errs: list[str] = []
    nxt = iter(range(n))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    r = c.post(url + "/v1/recognize", json={"utterances": dialogues[i % len(dialogues)], "use_llm": use_llm})
                    ok = r.status_code == 200
                    msg = f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, msg = False, repr(e)
                with lock:
                    (lat.append(time.perf_counter() - t) if ok else errs.append(msg))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return _stats(lat, len(errs), time.perf_counter() - t0, mode="serve", concurrency=concurrency, use_llm=use_llm,
                  first_errors=errs[:3])


def load_inprocess(ens, dialogues, n: int, concurrency: int, use_llm: bool) -> dict:
    """The same requests through the :class:`Ensemble` on local stage objects (no Ray, no HTTP)."""
    from mer_ray.serve import schemas as S

    async def run():
        lat: list[float] = []
        errs: list[str] = []
        it = iter(range(n))

        async def worker():
            for i in it:
                t = time.perf_counter()
                try:
                    req = S.RecognizeRequest.model_validate({"utterances": dialogues[i % len(dialogues)], "use_llm": use_llm})
                    out = await ens.recognize([u.model_dump() for u in req.utterances], req.use_llm, req.label_set)
                    json.dumps(S.RecognizeResponse.model_validate(out).model_dump())
                    lat.append(time.perf_counter() - t)
                except Exception as e:  # counted, as the HTTP run counts non-200 answers
                    errs.append(repr(e)[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return _stats(lat, len(errs), time.perf_counter() - t0, mode="inprocess", concurrency=concurrency,
                      use_llm=use_llm, first_errors=errs[:3])

    return asyncio.run(run())


def run_bench(out, models_dir=None, config=None, n_requests: int = 500, n_llm: int = 50, levels=(1, 4, 16),
              port: int = 8011, data_dir=None, num_cpus=None, warmup: int = 5, overrides: list[str] | None = None) -> dict:
    """Run every setting (Serve first, then in process) and write the JSON report to ``out``."""
    import ray
    from ray import serve

    from mer_ray.serve.builder import check_models
    from mer_ray.serve.deploy import deploy, resolve, serve_env, start_local_ray
    from mer_ray.serve.ensemble import Ensemble
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.serve.members import FusionMember, RefinerMember, VanillaMember

    cfg, options, _ = resolve(config or "serve/bench.yaml", [("models_dir", models_dir), *(overrides or [])])
    if any("autoscaling_config" in o for o in options.values()):
        raise ValueError("the benchmark needs fixed replica counts (num_replicas), not autoscaling_config")
    if n_llm <= 0:  # no LLM setting: deploy without the refiner and fusion
        cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"enabled": False})})
    built_demo_models = False
    if check_models(cfg):
        if models_dir is not None:  # the user named a directory: never train into it behind their back
            from mer_ray.serve.builder import require_models

            require_models(cfg)
        # A leaf may build what it measures: the demo's models (a generated corpus), recorded in the JSON.
        from mer_ray.demo.run import STEPS, run_demo

        print(f"bench serve: no models in {cfg.models_dir}; building the demo models first (recorded in the JSON)")
        run_demo(Path(cfg.models_dir).parent, steps=[(n, f) for n, f in STEPS if n != "serve"])
        built_demo_models = True
    dialogues, source = payloads(data_dir)
    llm = cfg.llm.enabled and n_llm > 0
    settings = [(c, False, n_requests) for c in levels] + ([(4, True, n_llm)] if llm else [])
    report = {"command": "mer bench serve", "payloads": source, "n_dialogues": len(dialogues),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_start": os.getloadavg()},
              "config": str(config or "serve/bench.yaml"), "replicas": {k: v.get("num_replicas") for k, v in options.items()},
              "models_dir": cfg.models_dir, "built_demo_models": built_demo_models, "serve_env": serve_env(), "torch_threads": cfg.torch_threads, "results": []}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(partial: bool) -> None:  # after every setting, so an interrupted run keeps what it measured
        out.write_text(json.dumps({**report, "partial": partial}, indent=2))

    start_local_ray(num_cpus=num_cpus)
    try:
        url = deploy(cfg, options, port=port)
        for c, use_llm, n in settings:
            w = 1 if use_llm else warmup  # warm-up requests, not counted (one suffices to load the LLM)
            load_http(url, dialogues, w, min(c, w), use_llm)
            res = load_http(url, dialogues, n, c, use_llm)
            print(json.dumps({k: res[k] for k in ("mode", "concurrency", "use_llm", "rps", "p50_ms", "p99_ms", "errors")}))
            report["results"].append(res)
            save(True)
    finally:
        serve.shutdown()
        ray.shutdown()
    from mer_ray.calibration.artifacts import Calibration

    th = cfg.torch_threads
    ens = Ensemble.local(RequestFeaturizer(th), VanillaMember(cfg.models_dir, th),
                         RefinerMember(cfg.models_dir, cfg.llm.model_dump(), cfg.llm.n_threads) if llm else None,
                         FusionMember(cfg.models_dir, th) if llm else None,
                         calibration=Calibration.load(cfg.models_dir))  # as the Serve ingress applies it
    for c, use_llm, n in settings:
        w = 1 if use_llm else warmup
        load_inprocess(ens, dialogues, w, min(c, w), use_llm)
        res = load_inprocess(ens, dialogues, n, c, use_llm)
        print(json.dumps({k: res[k] for k in ("mode", "concurrency", "use_llm", "rps", "p50_ms", "p99_ms", "errors")}))
        report["results"].append(res)
        save(True)
    pick = {(r["mode"], r["concurrency"], r["use_llm"]): r for r in report["results"]}
    top = max(levels)
    s, p = pick[("serve", top, False)], pick[("inprocess", top, False)]
    report["errors"] = sum(r["errors"] for r in report["results"])
    report["serve_over_inprocess"] = round(s["rps"] / p["rps"], 3) if p["rps"] else None
    report["p99_over_p50"] = round(s["p99_ms"] / s["p50_ms"], 3) if s["p50_ms"] else None
    report["at_concurrency"] = top
    report["goals"] = {"zero_errors": report["errors"] == 0,
                       "serve_over_inprocess_at_least_0.7": bool(report["serve_over_inprocess"] and report["serve_over_inprocess"] >= 0.7),
                       "p99_over_p50_at_most_3": bool(report["p99_over_p50"] and report["p99_over_p50"] <= 3)}
    save(False)
    return report
