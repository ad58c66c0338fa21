"""The ``mer`` console script: one subcommand per stage.

Each subcommand is a plain function whose signature is its help. Heavy imports
happen inside the functions so ``mer --help`` stays fast. The commands live in
``mer_ray/commands/*.py``, which register themselves on the apps below.
"""

from __future__ import annotations

import os

import typer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

app = typer.Typer(help="mer-ray: multimodal emotion recognition in conversations, on Ray.", no_args_is_help=True)
predict_app = typer.Typer(help="Write per-utterance probability distributions.", no_args_is_help=True)
lantern_app = typer.Typer(help="Lantern: LLM prompting per receptive field, and fusion.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that write JSON.", no_args_is_help=True)
app.add_typer(predict_app, name="predict")
app.add_typer(lantern_app, name="lantern")
app.add_typer(bench_app, name="bench")

# Registration happens on import; keep this list in sync with mer_ray/commands/.
from mer_ray.commands import data as _data  # noqa: E402,F401
from mer_ray.commands import extract as _extract  # noqa: E402,F401
from mer_ray.commands import vanilla as _vanilla  # noqa: E402,F401
from mer_ray.commands import lantern as _lantern  # noqa: E402,F401
from mer_ray.commands import finetune as _finetune  # noqa: E402,F401
from mer_ray.commands import serving as _serving  # noqa: E402,F401

if __name__ == "__main__":
    app()
