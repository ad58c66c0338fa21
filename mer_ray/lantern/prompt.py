"""``mer lantern prompt`` from top to bottom: read, build queries, run the job on the running Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from mer_ray.lantern.config import PromptJobConfig
from mer_ray.lantern.queries import build_queries, few_shot_examples, read_vanilla, with_content_free
from mer_ray.llm.backends import prompt_format_for
from mer_ray.llm.prompts import PromptTemplate


def make_queries(cfg: PromptJobConfig) -> tuple[pa.Table, list[str]]:
    """The query table (content-free query included) and the label strings to score."""
    van, labels, _ = read_vanilla(cfg.vanilla)
    template = PromptTemplate.load(cfg.template)
    if cfg.backend == "ray_data_http":  # the served model's GGUF renders its prompts
        chat_t, bos, eos = prompt_format_for({"kind": "llama_cpp", "model": cfg.http.tokenizer, "chat": cfg.http.chat})
    else:
        chat_t, bos, eos = prompt_format_for(cfg.backend)
    examples = None
    if cfg.few_shot:
        if not cfg.data_dir:
            raise ValueError("few_shot > 0 needs data_dir (MELD) to draw examples from train")
        from mer_ray.data.loaders import load_meld

        examples = few_shot_examples(load_meld(cfg.data_dir, "train"), cfg.few_shot, labels, cfg.seed,
                                     forbid_dialogues=set(van["dialogue_id"].to_pylist()))
    parts = []
    for split in cfg.splits:
        sub = van.filter(pc.equal(van["split"], split)) if "split" in van.column_names else van
        if not sub.num_rows:
            raise ValueError(f"{cfg.vanilla}: no rows for split {split!r}")
        parts.append(build_queries(sub, template, cfg.sizes, cfg.stride, chat_t, bos, eos, examples,
                                   max_dialogues=cfg.max_dialogues))
    q = with_content_free(pa.concat_tables(parts), template, labels, chat_t, bos, eos, examples)
    return q, template.labels(labels, chat_t is not None)


def _differs(saved: dict, now: dict) -> bool:
    """Whether two job keys disagree on a setting both record (newer fields default to equal)."""
    for k in set(saved) & set(now):
        if isinstance(saved[k], dict) and isinstance(now[k], dict):
            if _differs(saved[k], now[k]):
                return True
        elif saved[k] != now[k]:
            return True
    return False


def prompt_main(cfg: PromptJobConfig) -> dict:
    """Run (or resume) a prompt job on the running Ray; refuses to mix settings in one output directory."""
    from mer_ray.lantern.job import run_prompt_job

    if not cfg.vanilla or not cfg.out:
        raise ValueError("both vanilla and out are required")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # what decides a query's prompt and scores; engines and scope may change between resumes
    key = {**cfg.model_dump(include={"vanilla", "sizes", "stride", "template", "few_shot", "seed"})}
    if cfg.backend == "ray_data_http":
        key["backend"] = {"kind": "ray_data_http", **cfg.http.model_dump(include={"base_url", "model", "tokenizer", "chat", "mode"})}
    else:
        key["backend"] = cfg.backend.model_dump(include={"kind", "model", "gguf_file", "base_url", "chat", "http_mode"})
    saved = out / "job.json"
    if saved.exists() and _differs(json.loads(saved.read_text()), json.loads(json.dumps(key))):
        raise ValueError(f"{out} holds a run with other settings ({saved}); use another --out")
    saved.write_text(json.dumps(key, indent=2))
    queries, labels = make_queries(cfg)
    if cfg.backend == "ray_data_http":
        from mer_ray.lantern.http_backend import run_http_prompt_job

        summary = run_http_prompt_job(queries, out, cfg.http, labels)
    else:
        summary = run_prompt_job(queries, out, cfg.backend.model_dump(), labels, num_actors=cfg.actors,
                                 cpus_per_actor=cfg.cpus_per_actor)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
