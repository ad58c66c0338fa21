"""The ``mer`` console script: one root Typer app that adds each area's own app.

Each area's ``cli.py`` defines its commands as plain functions whose signatures
are their help; heavy imports happen inside them, so ``mer --help`` stays fast.
Imports run one way: this module imports the areas, never the reverse.
"""

from __future__ import annotations

import typer

from mer_ray.bench import cli as bench
from mer_ray.calibration import cli as calibration
from mer_ray.data import cli as data
from mer_ray.demo import cli as demo
from mer_ray.ensemble import cli as ensemble
from mer_ray.features import cli as features
from mer_ray.lantern import cli as lantern
from mer_ray.mllm import cli as mllm
from mer_ray.runtime import set_offline_env
from mer_ray.serve import cli as serve
from mer_ray.vanilla import cli as vanilla

set_offline_env()

app = typer.Typer(help="mer-ray: multimodal emotion recognition in conversations, on Ray.", no_args_is_help=True)
predict = typer.Typer(help="Write per-utterance probability distributions.", no_args_is_help=True)
for area in (features, vanilla, mllm, ensemble, calibration, serve, demo):
    app.add_typer(area.app)  # an unnamed sub-app: its commands are top-level (mer extract, mer train, ...)
for area in (vanilla, mllm, ensemble):
    predict.add_typer(area.predict_app)
app.add_typer(predict, name="predict")
app.add_typer(lantern.app, name="lantern")
app.add_typer(data.app, name="data")
app.add_typer(bench.app, name="bench")

if __name__ == "__main__":
    app()
