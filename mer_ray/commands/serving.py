"""`mer` subcommands for the serving area: ``mer serve`` and ``mer bench serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mer_ray.cli import app, bench_app, lantern_app, predict_app  # noqa: F401


@app.command("serve")
def serve_cmd(
    models: Optional[str] = typer.Option(None, "--models", help="Models dir with vanilla/, fusion/ (and mllm/); default: the config's, runs/demo/models (trained first if absent)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Serve application YAML (default serve/mer.yaml)."),
    host: str = typer.Option("127.0.0.1", help="HTTP host."),
    port: int = typer.Option(8000, help="HTTP port."),
    no_llm: bool = typer.Option(False, "--no-llm", help="Deploy without the LLM refiner and fusion (vanilla only)."),
    num_cpus: Optional[float] = typer.Option(None, help="CPUs of the local Ray instance (default: all)."),
    api_key_env: Optional[str] = typer.Option(None, help="Require 'Authorization: Bearer $VAR' where VAR is this environment variable."),
    demo_request: bool = typer.Option(False, "--demo-request", help="Once up, send a real request and print the answer."),
    exit_after: bool = typer.Option(False, "--exit", help="Shut down after start-up (and the demo request) instead of serving until Ctrl-C."),
):
    """Run the ensemble on a local Ray with Serve, on http://127.0.0.1:8000 by default."""
    import os
    import time

    from mer_ray.serve.run import serve_local

    url = serve_local(config, models, host, port, no_llm, num_cpus, api_key_env)
    typer.echo(f"mer serve: up at {url}  (docs {url}/docs, health {url}/healthz)")
    try:
        if demo_request:
            from mer_ray.serve.demo import demo_request as send

            send(url, use_llm=not no_llm, api_key=os.environ.get(api_key_env) if api_key_env else None)
        while not exit_after:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


@bench_app.command("serve")
def bench_serve_cmd(
    out: Path = typer.Option(..., "--out", help="JSON file to write."),
    models: Optional[str] = typer.Option(None, "--models", help="Models dir (default runs/demo/models, trained first if absent)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Serve YAML with fixed replicas (default serve/bench.yaml)."),
    requests: int = typer.Option(500, help="Requests per concurrency level without the LLM."),
    llm_requests: int = typer.Option(50, help="Requests with the LLM (at concurrency 4)."),
    concurrency: str = typer.Option("1,4,16", help="Concurrency levels without the LLM."),
    port: int = typer.Option(8011, help="HTTP port on 127.0.0.1."),
    data_dir: Optional[Path] = typer.Option(None, help="MELD dir for payloads (default ../shared/data/meld when present, else generated)."),
    num_cpus: Optional[float] = typer.Option(None, help="CPUs of the local Ray instance (default: all)."),
):
    """Bounded load on 127.0.0.1, against the same pipeline in-process: rps, p50, p99, errors (JSON)."""
    import json

    from mer_ray.serve.bench import run_bench

    res = run_bench(out=out, models_dir=models, config=config, n_requests=requests, n_llm=llm_requests,
                    levels=[int(c) for c in concurrency.split(",")], port=port, data_dir=data_dir, num_cpus=num_cpus)
    typer.echo(json.dumps({k: res[k] for k in ("errors", "serve_over_inprocess", "p99_over_p50")}, indent=1))
    typer.echo(f"wrote {out}")
