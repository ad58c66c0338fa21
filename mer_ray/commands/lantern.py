"""`mer` subcommands for the lantern area: prompt, fuse, show-prompt, and the benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mer_ray.cli import app, bench_app, lantern_app, predict_app  # noqa: F401
from mer_ray.llm.prompts import DEFAULT_TEMPLATE


@lantern_app.command("show-prompt")
def show_prompt(
    vanilla: Path = typer.Option(..., help="vanilla prediction Parquet"),
    dialogue: Optional[str] = typer.Option(None, help="dialogue id (default: the first)"),
    size: str = typer.Option("4", help="receptive-field size or 'whole'"),
    start: int = typer.Option(0, help="field start position"),
    target: int = typer.Option(0, help="target position (inside the field)"),
    model: str = typer.Option("smollm2-135m-instruct", help="GGUF path or embedded name (for its chat template)"),
    template: str = typer.Option(DEFAULT_TEMPLATE, help="template name or .j2 path"),
    chat: bool = typer.Option(True, help="wrap in the model's chat template if it has one"),
    few_shot: int = typer.Option(0, help="k few-shot examples from train (needs --data-dir)"),
    data_dir: Optional[Path] = typer.Option(None, help="MELD directory (few-shot examples from train)"),
) -> None:
    """Print one rendered prompt, exactly as the LLM receives it, and the label strings scored."""
    from mer_ray.lantern.queries import (dialogues, few_shot_examples, parse_sizes, prompt_context,
                                         read_vanilla)
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


@lantern_app.command("prompt")
def prompt(
    vanilla: Optional[Path] = typer.Option(None, help="vanilla prediction Parquet"),
    out: Optional[Path] = typer.Option(None, help="output directory (resumes if it exists)"),
    config: Optional[Path] = typer.Option(None, help="YAML config (jobs/lantern_prompt.yaml); options override it"),
    model: Optional[str] = typer.Option(None, help="GGUF path or embedded name (gemma3-270m, smollm2-135m-instruct)"),
    kind: Optional[str] = typer.Option(None, help="backend: llama_cpp, transformers, openai"),
    base_url: Optional[str] = typer.Option(None, help="openai backend: endpoint, e.g. http://host:8000/v1"),
    sizes: Optional[str] = typer.Option(None, help="receptive-field sizes, e.g. 4,8,whole"),
    stride: Optional[int] = typer.Option(None, help="window stride"),
    splits: Optional[str] = typer.Option(None, help="comma-separated splits, e.g. dev,test"),
    max_dialogues: Optional[int] = typer.Option(None, help="first N dialogues per split"),
    actors: Optional[int] = typer.Option(None, help="LLM engines in the actor pool"),
    n_threads: Optional[int] = typer.Option(None, help="threads per engine"),
    cpus_per_actor: Optional[float] = typer.Option(None, help="Ray CPUs per engine"),
    few_shot: Optional[int] = typer.Option(None, help="k few-shot examples from train"),
    data_dir: Optional[Path] = typer.Option(None, help="MELD directory (for few-shot examples)"),
    template: Optional[str] = typer.Option(None, help="prompt template name or .j2 path (default lantern_v2)"),
) -> None:
    """Score every (dialogue, receptive field, target) query with the LLM on Ray Data; write Parquet."""
    from mer_ray.lantern.config import PromptJobConfig, load_config
    from mer_ray.lantern.pipeline import prompt_main

    cfg = load_config(PromptJobConfig, config, vanilla=str(vanilla) if vanilla else None, out=str(out) if out else None,
                      model=model, kind=kind, base_url=base_url, sizes=sizes, stride=stride,
                      splits=splits.split(",") if splits else None, max_dialogues=max_dialogues, actors=actors,
                      n_threads=n_threads, cpus_per_actor=cpus_per_actor, few_shot=few_shot,
                      data_dir=str(data_dir) if data_dir else None, template=template)
    summary = prompt_main(cfg)
    typer.echo(json.dumps(summary, indent=2))


@lantern_app.command("fuse")
def fuse(
    vanilla: Optional[Path] = typer.Option(None, help="vanilla predictions covering dev and test"),
    llm: Optional[list[Path]] = typer.Option(None, help="prompt-job output directory (repeatable)"),
    data_dir: Optional[Path] = typer.Option(None, help="MELD directory (gold, for fitting on dev and scoring)"),
    out: Optional[Path] = typer.Option(None, help="report directory; fusion artifacts in <out>/fusion/"),
    config: Optional[Path] = typer.Option(None, help="YAML config (jobs/lantern_fuse.yaml)"),
    folds: Optional[int] = typer.Option(None, help="k-fold cross-fitting on dev"),
    stride: Optional[int] = typer.Option(None, help="the prompt job's stride (for the size ablation)"),
    seed: Optional[int] = typer.Option(None),
) -> None:
    """Fit the receptive-field-aware fusion on dev (k-fold cross-fitting), select, report on test."""
    from mer_ray.lantern.config import FuseConfig, load_config
    from mer_ray.lantern.report import run_fuse

    cfg = load_config(FuseConfig, config, vanilla=str(vanilla) if vanilla else None,
                      llm=[str(x) for x in llm] if llm else None, data_dir=str(data_dir) if data_dir else None,
                      out=str(out) if out else None, folds=folds, stride=stride, seed=seed)
    if not (cfg.vanilla and cfg.llm and cfg.data_dir and cfg.out):
        raise typer.BadParameter("vanilla, llm, data_dir and out are required (options or --config)")
    report = run_fuse(cfg.vanilla, cfg.llm, cfg.data_dir, cfg.out, k=cfg.folds, seed=cfg.seed, stride=cfg.stride)
    typer.echo((Path(cfg.out) / "report.md").read_text())
    typer.echo(f"report: {Path(cfg.out) / 'report.json'}; selected: {report['selected']}")


@bench_app.command("lantern")
def bench_lantern(
    out: Path = typer.Option(..., help="JSON file to write"),
    vanilla: Optional[Path] = typer.Option(None, help="fixed vanilla predictions (default: train a quick one)"),
    data_dir: Path = typer.Option(Path("../shared/data/meld"), help="MELD directory"),
    dialogues: int = typer.Option(40, help="first N MELD dev dialogues"),
    sizes: str = typer.Option("4,8,whole", help="receptive-field sizes"),
    actors: int = typer.Option(2, help="engines in the Ray job (default: as jobs/lantern_prompt.yaml)"),
    threads: int = typer.Option(1, help="threads per engine; the naive loop and raw rate use actors x threads"),
) -> None:
    """Lantern prompting: Ray job vs a naive loop vs the prefix-trie floor (Gemma 3 270M)."""
    from mer_ray.lantern.bench import run_bench

    res = run_bench(out, vanilla, data_dir, dialogues, sizes, actors, threads)
    typer.echo(json.dumps({k: res[k] for k in ("speedup_vs_naive", "wall_over_floor")}, indent=2))
