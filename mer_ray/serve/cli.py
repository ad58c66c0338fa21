"""`mer` subcommands for the serving area: ``mer serve`` and ``mer bench serve``."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer()


@app.command("serve")
def serve_cmd(
    models: str | None = typer.Option(
        None,
        "--models",
        help="Models dir with vanilla/, fusion/ (and mllm/), or an `mer ensemble` run dir (served as measured); "
        "default: the config's models_dir. "
        "Nothing is trained here: a missing model exits 1 and names the command that makes it.",
    ),
    config: Path | None = typer.Option(None, "--config", help="Serve application YAML (default serve/mer.yaml)."),
    host: str = typer.Option("127.0.0.1", help="HTTP host."),
    port: int = typer.Option(8000, help="HTTP port."),
    no_llm: bool = typer.Option(False, "--no-llm", help="Deploy without the LLM refiner and fusion (vanilla only)."),
    num_cpus: float | None = typer.Option(None, help="CPUs of the local Ray instance (default: all)."),
    api_key_env: str | None = typer.Option(None, help="Require 'Authorization: Bearer $VAR' where VAR is this environment variable."),
    demo_request: bool = typer.Option(False, "--demo-request", help="Once up, send a real request and print the answer."),
    exit_after: bool = typer.Option(False, "--exit", help="Shut down after start-up (and the demo request) instead of serving until Ctrl-C."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of the app's args, e.g. --set torch_threads=2 (repeatable)."),
):
    """Run the ensemble on a local Ray with Serve, on http://127.0.0.1:8000 by default."""
    import os
    import time

    from mer_ray.serve.builder import MissingModelsError
    from mer_ray.serve.deploy import serve_local

    try:
        url = serve_local(config, models, host, port, no_llm, num_cpus, api_key_env, set_)
    except (MissingModelsError, FileNotFoundError, ValueError) as e:
        typer.echo(f"mer serve: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"mer serve: up at {url}  (docs {url}/docs, health {url}/healthz)")
    try:
        if demo_request:
            from mer_ray.serve.client import recognize as send

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
