"""``mer demo``: the main job on a generated corpus. A leaf: nothing but the root CLI imports it."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer()


@app.command("demo")
def demo(out: Path = typer.Option(Path("runs/demo"), help="demo run directory")) -> None:
    """The main job on a generated corpus (a plumbing check, never an accuracy figure)."""
    from mer_ray.demo.run import run_demo

    run_demo(out)
