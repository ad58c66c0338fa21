"""Start the application on a local Ray (``mer serve``, tests, the benchmark) and wait for it.

A local Ray is always started with ``address="local"``: it never attaches to a
cluster already running on the machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mer_ray.serve.app import build_app, ensure_models, read_serve_yaml
from mer_ray.serve.config import ServeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "serve" / "mer.yaml"


def resolve(config: str | Path | None = None, **overrides) -> tuple[ServeConfig, dict[str, dict], dict]:
    """(app config, per-deployment options, the YAML's app entry) from a Serve YAML plus CLI overrides."""
    path = Path(config) if config else DEFAULT_CONFIG
    _, app, options = read_serve_yaml(path)
    return load_config(app.get("args") or {}, **overrides), options, app


# Ray Serve's throughput-optimized mode (Ray >= 2.56): user code and the router run on the replica's own event loop
# instead of extra threads, gRPC between replicas, buffered request-path logs, frozen GC after start-up. Direct
# ingress (replicas serving HTTP on their own ports, meant to sit behind HAProxy) stays off, so the proxy keeps
# serving the configured host:port. A value already in the environment wins (set it to 0 to compare).
SERVE_PERF_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def serve_env() -> dict[str, str]:
    """The Serve performance settings, with the caller's environment taking precedence."""
    return {k: os.environ.get(k, v) for k, v in SERVE_PERF_ENV.items()}


def start_local_ray(num_cpus: float | None = None, object_store_memory: int = 256 * 2**20, temp_dir: str | None = None,
                    env: dict | None = None) -> None:
    """A fresh local Ray instance (never an existing cluster), quiet and small, with :data:`SERVE_PERF_ENV`."""
    import ray

    perf = serve_env()
    os.environ.update(perf)  # the local raylet, and so every worker, inherits the driver's environment
    env_vars = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **perf, **(env or {})}
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register: a loaded machine can miss it
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=object_store_memory, _temp_dir=temp_dir, runtime_env={"env_vars": env_vars})
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            print(f"local Ray did not start in time (machine busy?); retrying ({attempt + 1}/2)", flush=True)
            ray.shutdown()


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
                no_llm: bool = False, num_cpus: float | None = None, api_key_env: str | None = None) -> str:
    """What ``mer serve`` does before it blocks: resolve the config, make sure models exist, start Ray, deploy."""
    overrides = {"models_dir": models_dir, "api_key_env": api_key_env}
    cfg, options, app = resolve(config, **overrides)
    if no_llm:
        cfg = cfg.model_copy(update={"llm": cfg.llm.model_copy(update={"enabled": False})})
        options = {k: v for k, v in options.items() if k not in ("LLMRefiner", "Fusion")}
    if not cfg.use_mllm:
        options.pop("MLLM", None)
    ensure_models(cfg)
    env = {}
    if cfg.api_key_env and os.environ.get(cfg.api_key_env):
        env[cfg.api_key_env] = os.environ[cfg.api_key_env]  # replicas read the key from their environment
    import ray

    if not ray.is_initialized():  # e.g. the demo calls this on the Ray it already started
        start_local_ray(num_cpus=num_cpus, env=env)
    return deploy(cfg, options, host, port, name=app.get("name", "mer"), route_prefix=app.get("route_prefix", "/"))
