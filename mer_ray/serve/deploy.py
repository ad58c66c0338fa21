"""Start the application on a local Ray (``mer serve``, tests, the benchmark) and wait for it.

A local Ray is always started with ``address="local"``: it never attaches to a
cluster already running on the machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mer_ray.config import Overrides, load
from mer_ray.serve.builder import build_app, read_serve_yaml, require_models
from mer_ray.serve.config import ServeConfig

#: The Serve YAML used when none is given, read by path from the current directory (a checkout).
DEFAULT_CONFIG = Path("serve/mer.yaml")


def resolve(config: str | Path | None = None, overrides: Overrides | None = None) -> tuple[ServeConfig, dict[str, dict], dict]:
    """(app config, per-deployment options, the YAML's app entry) from a Serve YAML plus overrides of its ``args``."""
    path = Path(config) if config else DEFAULT_CONFIG
    if not path.is_file():
        hint = " (no --config given: run from a mer-ray checkout, or pass --config serve/mer.yaml's path)" if not config else ""
        raise FileNotFoundError(f"Serve config not found: {path}{hint}")
    _, app, options = read_serve_yaml(path)
    return load(ServeConfig, app.get("args") or {}, overrides), options, app


# Ray Serve's throughput-optimized mode (Ray >= 2.56): user code and the router run on the replica's own event loop
# instead of extra threads, gRPC between replicas, buffered request-path logs, frozen GC after start-up. Direct
# ingress (replicas serving HTTP on their own ports, meant to sit behind HAProxy) stays off, so the proxy keeps
# serving the configured host:port. A value already in the environment wins (set it to 0 to compare).
SERVE_PERF_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def serve_env() -> dict[str, str]:
    """The Serve performance settings, with the caller's environment taking precedence."""
    return {k: os.environ.get(k, v) for k, v in SERVE_PERF_ENV.items()}


def start_local_ray(num_cpus: float | None = None, object_store_memory: int = 256 * 2**20, temp_dir: str | None = None,
                    env: dict | None = None) -> bool:
    """A fresh local Ray instance (never an existing cluster), quiet and small, with :data:`SERVE_PERF_ENV`."""
    from mer_ray.runtime import start_ray

    return start_ray(num_cpus, address="local", object_store_memory=object_store_memory, temp_dir=temp_dir, log_to_driver=False,
                     env={**serve_env(), **(env or {})})


def requested_cpus(cfg: ServeConfig, options: dict[str, dict]) -> dict[str, float]:
    """Logical CPUs each configured deployment asks for (``num_cpus`` x replicas, the minimum under autoscaling).

    ``FinetunedLLM`` options apply to every fine-tuned member of an ``mer ensemble`` run, so they count once per member.
    """
    from mer_ray.serve.ensemble_run import fusion_config, is_ensemble_run

    members = (fusion_config(cfg.models_path).get("members") or []) if is_ensemble_run(cfg.models_path) else []
    out = {}
    for name, opt in options.items():
        n = opt.get("num_replicas", 1)
        if n == "auto" or opt.get("autoscaling_config"):
            n = (opt.get("autoscaling_config") or {}).get("min_replicas", 1)
        cpus = float((opt.get("ray_actor_options") or {}).get("num_cpus", 1)) * int(n)
        if name == "FinetunedLLM":
            out.update({f"FinetunedLLM_{m}": cpus for m in members if f"FinetunedLLM_{m}" not in options})
        else:
            out[name] = cpus
    return out


def check_cpus(cfg: ServeConfig, options: dict[str, dict], available: float) -> None:
    """Fail at once when the deployments ask for more logical CPUs than the local Ray has.

    Otherwise Serve waits forever for a replica it cannot place (``mer serve`` hangs with no error).
    """
    asked = requested_cpus(cfg, options)
    total = sum(asked.values())
    if total > available + 1e-9:
        detail = ", ".join(f"{k} {v:g}" for k, v in asked.items())
        raise ValueError(f"the Serve config asks for {total:g} CPUs ({detail}) but the local Ray has {available:g}: "
                         "lower ray_actor_options.num_cpus in the YAML, or pass a larger --num-cpus")


def deploy(cfg: ServeConfig, options: dict[str, dict], host: str = "127.0.0.1", port: int = 8000,
           name: str = "mer", route_prefix: str = "/", timeout_s: float = 300.0) -> str:
    """Deploy on the connected Ray, wait until ``/healthz`` answers, return the base URL."""
    import httpx
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(cfg, options), name=name, route_prefix=route_prefix)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    deadline = time.time() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=10).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"{url}/healthz did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def serve_local(config: str | Path | None = None, models_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                no_llm: bool = False, num_cpus: float | None = None, api_key_env: str | None = None,
                overrides: list[str] | None = None) -> str:
    """What ``mer serve`` does before it blocks: resolve the config, check the models exist, start Ray, deploy."""
    cfg, options, app = resolve(config, [("models_dir", models_dir), ("api_key_env", api_key_env), *(overrides or [])])
    if no_llm:
        cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"enabled": False})})
        llm_parts = ("LLMRefiner", "Fusion", "EnsembleFusion")
        options = {k: v for k, v in options.items() if k not in llm_parts and not k.startswith("FinetunedLLM")}
    if not cfg.use_mllm:
        options.pop("MLLM", None)
    if not cfg.adapters.enabled:
        options.pop("Adapters", None)
    require_models(cfg)  # before Ray starts: a missing model fails at once
    env = {}
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        env[cfg.api_key_env] = os.environ[cfg.api_key_env]  # replicas read the key from their environment
    import ray

    if not ray.is_initialized():  # e.g. the demo calls this on the Ray it already started
        start_local_ray(num_cpus=num_cpus, env=env)
        check_cpus(cfg, options, ray.cluster_resources().get("CPU", 0.0))  # a cluster may autoscale; a local Ray cannot
    return deploy(cfg, options, host, port, name=app.get("name", "mer"), route_prefix=app.get("route_prefix", "/"))
