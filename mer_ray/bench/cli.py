"""``mer bench ...``: every benchmark, each writing JSON. A leaf: nothing but the root CLI imports it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Benchmarks that write JSON.", no_args_is_help=True)


@app.command("extract")
def bench_extract(
    out: Path = typer.Option(..., help="JSON file to write."),
    n_utterances: int = typer.Option(60, help="Clips to generate (at least 60)."),
    seconds: float = typer.Option(3.0, help="Clip length."),
    fps: int = typer.Option(10, help="Frames per second of the clips."),
    width: int = typer.Option(320, help="Frame width in pixels."),
    work_dir: Path = typer.Option(None, help="Where clips and outputs go (default: a temp directory)."),
) -> None:
    """Time the Ray pipeline against a plain loop (default threads, and one thread); write JSON."""
    from mer_ray.bench.extract import run_bench

    if n_utterances < 60:
        typer.echo("mer bench extract: --n-utterances must be at least 60", err=True)
        raise typer.Exit(2)
    result = run_bench(n_utterances=n_utterances, seconds=seconds, fps=fps, width=width, work_dir=work_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    typer.echo(json.dumps({k: result[k] for k in ("speedup", "efficiency", "utterances_per_second")}, indent=2))


@app.command("lantern")
def bench_lantern(
    out: Path = typer.Option(..., help="JSON file to write"),
    vanilla: Path | None = typer.Option(None, help="fixed vanilla predictions (default: train a quick one)"),
    data_dir: Path | None = typer.Option(None, help="MELD directory (default: $MER_MELD_DIR)"),
    dialogues: int = typer.Option(40, help="first N MELD dev dialogues"),
    sizes: str = typer.Option("4,8,whole", help="receptive-field sizes"),
    actors: int = typer.Option(2, help="engines in the Ray job (default: as jobs/lantern_prompt.yaml)"),
    threads: int = typer.Option(1, help="threads per engine; the naive loop and raw rate use actors x threads"),
    part: str = typer.Option("job", help="job: Ray job vs naive loop vs floor; backends: in-process vs "
                             "ray_data_http on a fixed query subset (starts a llama_cpp.server); all: both"),
    http_queries: int = typer.Option(200, help="--part backends: size of the fixed query subset (seed 0)"),
) -> None:
    """Lantern prompting (Gemma 3 270M): Ray job vs a naive loop vs the prefix-trie floor, and backends side by side."""
    from mer_ray.bench.lantern import run_bench

    if part not in ("job", "backends", "all"):
        typer.echo(f"mer bench lantern: --part must be job, backends or all, not {part!r}", err=True)
        raise typer.Exit(2)
    res = run_bench(out, vanilla, data_dir, dialogues, sizes, actors, threads, part, http_queries)
    keys = [k for k in ("speedup_vs_naive", "wall_over_floor") if k in res]
    shown = {k: res[k] for k in keys}
    if "backends" in res:
        shown.update({k: res["backends"][k] for k in ("http_over_in_process_seconds", "http_over_in_process_tokens", "scores")})
    typer.echo(json.dumps(shown, indent=2))


@app.command("train")
def bench_train(
    out: Path = typer.Option(..., help="Output JSON."),
    steps: int = typer.Option(6, help="Timed LoRA steps (after warm-up)."),
    warmup: int = typer.Option(2, help="Untimed warm-up steps."),
    seq_len: int = typer.Option(256, help="Fixed sequence length of every batch."),
    batch: int = typer.Option(1, help="Sequences per step."),
    threads: int = typer.Option(2, help="Torch threads on both sides (Ray: the worker's CPUs and OMP_NUM_THREADS)."),
    base: str = typer.Option("gemma3-270m", help="Base LLM."),
    meld_dir: Path | None = typer.Option(None, help="MELD CSVs that supply the batches' text (default: $MER_MELD_DIR)."),
):
    """Plain PyTorch vs Ray Train + DeepSpeed ZeRO-2 (1 worker): the same LoRA steps on the same batches; key `overhead`."""
    from mer_ray.bench.finetune import run_bench

    res = run_bench(out, steps=steps, warmup=warmup, seq_len=seq_len, batch=batch, threads=threads, base=base, meld_dir=meld_dir)
    typer.echo(json.dumps({k: res[k] for k in ("plain_tokens_per_s", "ray_tokens_per_s", "overhead", "ray_startup_seconds")}))


@app.command("serve")
def bench_serve_cmd(
    out: Path = typer.Option(..., "--out", help="JSON file to write."),
    models: str | None = typer.Option(
        None,
        "--models",
        help="Models dir (default: the config's; when absent there, the demo models are built first and the JSON records it).",
    ),
    config: list[Path] = typer.Option([], "--config", help="Serve YAML with fixed replicas, repeatable: one layout each (default serve/bench.yaml)."),
    requests: int = typer.Option(500, help="Requests per setting and concurrency level without the LLM."),
    llm_requests: int = typer.Option(12, help="Requests with the LLM (Serve, concurrency 4; ~1-3 s each); 0 skips it."),
    concurrency: str = typer.Option("1,4,16", help="Concurrency levels without the LLM."),
    threads: str = typer.Option("1,2", help="Torch threads swept on every side."),
    pools: str = typer.Option("4,16", help="Worker-thread pool sizes swept on the uvicorn side."),
    port: int = typer.Option(8011, help="HTTP port on 127.0.0.1 (Serve; the uvicorn baseline takes the next one)."),
    data_dir: Path | None = typer.Option(None, help="MELD dir whose dev dialogues are the payloads (default $MER_MELD_DIR)."),
    payloads: str = typer.Option("meld", help="meld (needs --data-dir or $MER_MELD_DIR) or generated (the demo corpus)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: 40 requests, 4 with the LLM, 1 torch thread, pool 16."),
    num_cpus: float | None = typer.Option(None, help="CPUs of the local Ray instance (default: all)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of the app's args, e.g. --set llm.n_threads=1."),
):
    """Serve vs a plain uvicorn server vs in-process, same payloads and load: rps, p50, p99, errors, ratios (JSON)."""
    from mer_ray.bench.serve import run_bench
    from mer_ray.bench.serve_load import PayloadError

    if quick:
        requests, llm_requests, threads, pools = min(requests, 40), min(llm_requests, 4), "1", "16"
    try:
        res = run_bench(out=out, models_dir=models, configs=config or None, n_requests=requests, n_llm=llm_requests,
                        levels=[int(c) for c in concurrency.split(",")], port=port, data_dir=data_dir, payload_kind=payloads,
                        num_cpus=num_cpus, overrides=set_, threads=[int(t) for t in threads.split(",")],
                        pools=[int(p) for p in pools.split(",")])
    except PayloadError as e:
        typer.echo(f"mer bench serve: {e}", err=True)
        raise typer.Exit(2) from None
    keys = ("errors", "serve_over_uvicorn", "serve_over_inprocess", "serve_over_inprocess_batched", "p99_over_p50", "c1_p50_over_uvicorn")
    typer.echo(json.dumps({k: res[k] for k in keys}, indent=1))
    typer.echo(f"wrote {out}")


@app.command("serve-check")
def bench_serve_check_cmd(
    models: str = typer.Option(..., "--models", help="The `mer ensemble` run directory to serve (e.g. runs/ensemble_meld)."),
    predictions: Path = typer.Option(..., "--predictions", help="The run's measured test_predictions.parquet."),
    meld_dir: Path = typer.Option(..., "--meld-dir", help="MELD directory (its test_sent_emo.csv gives the dialogues)."),
    n: int = typer.Option(20, "--n", help="Test dialogues to post (spread evenly over the dialogue ids)."),
    out: Path = typer.Option(..., "--out", help="JSON file to write."),
    config: str | None = typer.Option(None, "--config", help="Serve YAML (default serve/ensemble.yaml)."),
    url: str | None = typer.Option(None, "--url", help="A service already up (default: start mer serve here)."),
    port: int = typer.Option(8012, help="HTTP port on 127.0.0.1 of the service started here."),
    num_cpus: float | None = typer.Option(None, help="CPUs of the local Ray instance (default: all)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of the app's args, e.g. --set torch_threads=2."),
):
    """Post MELD test dialogues to the served ensemble; largest |delta probs| against the measured predictions (JSON)."""
    from mer_ray.bench.serve_check import run_check

    res = run_check(models, predictions, meld_dir, n, out, config, port, url, num_cpus, overrides=set_)
    typer.echo(json.dumps({k: res[k] for k in ("n_dialogues", "max_abs_diff", "goal", "pass")}, indent=1))
    typer.echo(f"wrote {out}")


@app.command("probe")
def bench_probe_cmd(
    out: Path = typer.Option(Path("docs/bench/probe/probe.json"), "--out", help="JSON file to write (the bar plot goes beside it, .png)."),
    manifest: Path | None = typer.Option(None, "--manifest", help="A manifest with `split` (default: generate the clip corpus)."),
    media_root: Path | None = typer.Option(None, "--media-root", help="Where the manifest's media paths resolve (default: its directory)."),
    n_per_label: int = typer.Option(150, help="Generated clips per label (split 60/20/20 per label: 120 test clips by default)."),
    corpus_seed: int = typer.Option(0, help="Seed of the generated corpus."),
    face: bool = typer.Option(True, help="Generated clips carry a face (else audio-only wav files)."),
    config: Path | None = typer.Option(None, "--config", help="A PipelineConfig YAML to run instead of the bench's clip recipe."),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds overriding the config's (default 0,1,2)."),
    sets: str | None = typer.Option(None, help="Comma-separated feature sets to run (default: all the corpus has)."),
    work_dir: Path | None = typer.Option(None, help="Corpus, feature store and models (default: a temporary directory)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key of the config, e.g. --set train.epochs=20."),
) -> None:
    """Vanilla model vs its linear probe on real openSMILE and FER features of generated clips, per modality (JSON + PNG)."""
    from mer_ray.bench.probe import run_bench

    res = run_bench(out, manifest=manifest, media_root=media_root, work_dir=work_dir, n_per_label=n_per_label,
                    corpus_seed=corpus_seed, face=face, config=config, overrides=set_,
                    seeds=[int(s) for s in seeds.split(",")] if seeds else None, sets=sets.split(",") if sets else None)
    typer.echo(json.dumps({"pass": res["pass"], **{k: {"model_acc": round(v["model"]["test"]["accuracy"], 2),
                                                       "probe_acc": round(v["probe"]["test"]["accuracy"], 2), "pass": v["pass"]}
                                                   for k, v in res["feature_sets"].items()}}, indent=1))
    typer.echo(f"wrote {out}")


@app.command("chaos")
def bench_chaos_cmd(
    out: Path = typer.Option(..., "--out", help="JSON file to write."),
    work_dir: Path | None = typer.Option(None, help="Where the runs write (default: a temporary directory)."),
    meld_dir: Path | None = typer.Option(None, help="MELD directory for the LLM fine-tuning scenario (default: $MER_MELD_DIR)."),
    models: str | None = typer.Option(None, "--models", help="Models directory for the Serve scenarios (chaos_serve)."),
    only: str | None = typer.Option(None, help="Comma-separated scenario names to run (default: all)."),
) -> None:
    """Kill a node, an actor or a worker mid-run in every stage, on a 1 + 2 node test cluster; lost, duplicated, recovery (JSON)."""
    import os

    from mer_ray.bench.chaos import run_bench

    meld = meld_dir or (Path(os.environ["MER_MELD_DIR"]) if os.environ.get("MER_MELD_DIR") else None)
    res = run_bench(out, work_dir=work_dir, meld_dir=meld, models_dir=models, only=only.split(",") if only else None)
    typer.echo(json.dumps({k: {f: v.get(f) for f in ("lost", "duplicated", "recovery_s", "failed_requests")}
                           for k, v in res["scenarios"].items()}, indent=1))
    typer.echo(f"wrote {out}")
