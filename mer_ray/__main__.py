"""``python -m mer_ray``: the ``mer`` console script."""

from mer_ray.cli import app

app(prog_name="mer")
