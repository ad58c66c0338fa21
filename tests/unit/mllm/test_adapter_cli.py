"""``mer finetune --adapter-name NAME --models DIR`` installs the fine-tuned directory as a named adapter, and
refuses a bad name or a missing models directory before any training starts."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[3]


def _run(*args):
    from mer_ray.cli import app

    return CliRunner().invoke(app, ["finetune", "--config", str(REPO / "jobs/finetune_cpu.yaml"), *args])


def _text(r) -> str:
    """The output without typer's error box, on one line (the box wraps long messages)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())


def test_bad_name_and_missing_models_fail_before_training(tmp_path):
    r = _run("--adapter-name", "Call Centre", "--models", str(tmp_path))
    assert r.exit_code != 0 and "must match" in str(r.exception or r.output)
    r = _run("--adapter-name", "calls", "--models", str(tmp_path / "nowhere"))
    assert r.exit_code != 0 and "--adapter-name needs --models" in _text(r)


def test_a_fine_tuned_directory_becomes_a_named_adapter(tmp_path):
    from mer_ray.mllm.adapters import list_adapters
    from mer_ray.mllm.tiny import build_tiny_finetuned, build_tiny_lm

    ft = build_tiny_finetuned(build_tiny_lm(tmp_path / "base", "gemma3"), tmp_path / "ft", "iemocap4", 0)
    (tmp_path / "models").mkdir()
    args = ("--eval-only", str(ft), "--no-eval", "--adapter-name", "calls", "--models", str(tmp_path / "models"))
    r = _run(*args)
    assert r.exit_code == 0, r.output
    assert "adapter 'calls' installed" in r.output and list_adapters(tmp_path / "models") == {"calls": "iemocap4"}
    r = _run(*args)
    assert r.exit_code != 0 and "pass --overwrite" in _text(r)
    assert _run(*args, "--overwrite").exit_code == 0
