"""`mer` subcommands for the lantern area: prompt, fuse, show-prompt, and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mer_ray.llm.prompts import DEFAULT_TEMPLATE

app = typer.Typer(help="Lantern: LLM prompting per receptive field, and fusion.", no_args_is_help=True)


@app.command("show-prompt")
def show_prompt(
    vanilla: Path = typer.Option(..., help="vanilla prediction Parquet"),
    dialogue: str | None = typer.Option(None, help="dialogue id (default: the first)"),
    size: str = typer.Option("4", help="receptive-field size or 'whole'"),
    start: int = typer.Option(0, help="field start position"),
    target: int = typer.Option(0, help="target position (inside the field)"),
    model: str = typer.Option("smollm2-135m-instruct", help="GGUF path or embedded name (for its chat template)"),
    template: str = typer.Option(DEFAULT_TEMPLATE, help="template name or .j2 path"),
    chat: bool = typer.Option(True, help="wrap in the model's chat template if it has one"),
    few_shot: int = typer.Option(0, help="k few-shot examples from train (needs --data-dir)"),
    data_dir: Path | None = typer.Option(None, help="MELD directory (few-shot examples from train)"),
) -> None:
    """Print one rendered prompt, exactly as the LLM receives it, and the label strings scored."""
    from mer_ray.lantern.queries import dialogues, few_shot_examples, parse_sizes, prompt_context, read_vanilla
    from mer_ray.llm.backends import prompt_format_for
    from mer_ray.llm.prompts import PromptTemplate

    van, labels, sent = read_vanilla(vanilla)
    tpl = PromptTemplate.load(template)
    chat_t, bos, eos = prompt_format_for({"kind": "llama_cpp", "model": model, "chat": chat})
    dias = dialogues(van)
    rows = dias[dialogue or next(iter(dias))]
    (sz,) = parse_sizes(size)
    end = len(rows) if sz is None else min(len(rows), start + sz)
    if not start <= target < end:
        raise typer.BadParameter(f"target {target} is outside the field [{start}, {end})")
    examples = None
    if few_shot:
        from mer_ray.data.loaders import load_meld

        examples = few_shot_examples(load_meld(data_dir, "train"), few_shot, labels)
    ctx = prompt_context(rows, start, end, target, labels, labels, sent, tpl.meta.top_k, examples)
    typer.echo(tpl.render(ctx, chat_t, bos, eos))
    typer.echo(f"\n--- template {tpl.tag}; labels scored: {tpl.labels(labels, chat_t is not None)}", err=True)


@app.command("prompt")
def prompt(
    vanilla: Path | None = typer.Option(None, help="vanilla prediction Parquet"),
    out: Path | None = typer.Option(None, help="output directory (resumes if it exists)"),
    config: Path | None = typer.Option(None, help="YAML config (jobs/lantern_prompt.yaml); options override it"),
    model: str | None = typer.Option(None, help="GGUF path or embedded name (gemma3-270m, smollm2-135m-instruct)"),
    kind: str | None = typer.Option(None, help="backend: llama_cpp, transformers, openai"),
    base_url: str | None = typer.Option(None, help="openai backend: endpoint, e.g. http://host:8000/v1"),
    sizes: str | None = typer.Option(None, help="receptive-field sizes, e.g. 4,8,whole"),
    stride: int | None = typer.Option(None, help="window stride"),
    splits: str | None = typer.Option(None, help="comma-separated splits, e.g. dev,test"),
    max_dialogues: int | None = typer.Option(None, help="first N dialogues per split"),
    actors: int | None = typer.Option(None, help="LLM engines in the actor pool"),
    n_threads: int | None = typer.Option(None, help="threads per engine"),
    cpus_per_actor: float | None = typer.Option(None, help="Ray CPUs per engine"),
    few_shot: int | None = typer.Option(None, help="k few-shot examples from train"),
    data_dir: Path | None = typer.Option(None, help="MELD directory (for few-shot examples)"),
    template: str | None = typer.Option(None, help="prompt template name or .j2 path (default lantern_v2)"),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set backend.n_ctx=2048 (repeatable)."),
) -> None:
    """Score every (dialogue, receptive field, target) query with the LLM on Ray Data; write Parquet."""
    import ray

    from mer_ray.config import load
    from mer_ray.lantern.config import PromptJobConfig
    from mer_ray.lantern.prompt import prompt_main
    from mer_ray.runtime import start_ray

    options = {"vanilla": str(vanilla) if vanilla else None, "out": str(out) if out else None, "backend.model": model,
               "backend.kind": kind, "backend.base_url": base_url, "sizes": sizes, "stride": stride,
               "splits": splits.split(",") if splits else None, "max_dialogues": max_dialogues, "actors": actors,
               "backend.n_threads": n_threads, "cpus_per_actor": cpus_per_actor, "few_shot": few_shot,
               "data_dir": str(data_dir) if data_dir else None, "template": template}
    cfg = load(PromptJobConfig, config, [*options.items(), *set_])
    # Ray nices workers to 15 by default; the LLM actors are this job's main work.
    started = start_ray(cfg.ray_cpus, log_to_driver=False, worker_niceness=0)
    try:
        summary = prompt_main(cfg)
    finally:
        if started:
            ray.shutdown()
    typer.echo(json.dumps(summary, indent=2))


@app.command("fuse")
def fuse(
    vanilla: Path | None = typer.Option(None, help="vanilla predictions covering dev and test"),
    llm: list[Path] | None = typer.Option(None, help="prompt-job output directory (repeatable)"),
    data_dir: Path | None = typer.Option(None, help="MELD directory (gold, for fitting on dev and scoring)"),
    out: Path | None = typer.Option(None, help="report directory; fusion artifacts in <out>/fusion/"),
    config: Path | None = typer.Option(None, help="YAML config (jobs/lantern_fuse.yaml)"),
    folds: int | None = typer.Option(None, help="k-fold cross-fitting on dev"),
    stride: int | None = typer.Option(None, help="the prompt job's stride (for the size ablation)"),
    seed: int | None = typer.Option(None),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set folds=3 (repeatable)."),
) -> None:
    """Fit the receptive-field-aware fusion on dev (k-fold cross-fitting), select, report on test."""
    from mer_ray.config import load
    from mer_ray.data.loaders import meld_dir
    from mer_ray.lantern.config import FuseConfig
    from mer_ray.lantern.fuse import run_fuse

    options = {"vanilla": str(vanilla) if vanilla else None, "llm": [str(x) for x in llm] if llm else None,
               "data_dir": str(data_dir) if data_dir else None, "out": str(out) if out else None, "folds": folds,
               "stride": stride, "seed": seed}
    cfg = load(FuseConfig, config, [*options.items(), *set_])
    if not (cfg.vanilla and cfg.llm and cfg.out):
        raise typer.BadParameter("vanilla, llm and out are required (options or --config)")
    report = run_fuse(cfg.vanilla, cfg.llm, meld_dir(cfg.data_dir), cfg.out, k=cfg.folds, seed=cfg.seed, stride=cfg.stride)
    typer.echo((Path(cfg.out) / "report.md").read_text())
    typer.echo(f"report: {Path(cfg.out) / 'report.json'}; selected: {report['selected']}")
