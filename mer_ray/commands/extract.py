"""`mer` subcommands for the extract area."""

from __future__ import annotations

from mer_ray.cli import app, bench_app, lantern_app, predict_app  # noqa: F401
