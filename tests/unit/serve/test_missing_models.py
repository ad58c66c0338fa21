"""`mer serve` with a models directory that lacks a model exits 1 at once, names the missing files and
the commands that make them, and trains nothing (no Ray is started, nothing is written)."""

from __future__ import annotations

from typer.testing import CliRunner

from mer_ray.cli import app


def test_mer_serve_without_models_exits_1_and_names_what_makes_them(tmp_path, monkeypatch):
    import mer_ray.serve.deploy as deploy

    def no_ray(*a, **k):
        raise AssertionError("mer serve started Ray although a model is missing")

    monkeypatch.setattr(deploy, "start_local_ray", no_ray)  # a spy on our own code path, not a stand-in
    models = tmp_path / "models"
    models.mkdir()
    res = CliRunner().invoke(app, ["serve", "--config", "serve/mer.yaml", "--models", str(models), "--exit"])
    assert res.exit_code == 1, res.output
    out = res.output
    assert f"{models}/vanilla/vanilla.json" in out and f"{models}/fusion/fusion.json" in out
    assert "mer pipeline --dataset meld" in out and "mer demo" in out and "mer lantern fuse" in out
    assert list(models.iterdir()) == []  # and trained nothing behind the user's back


def test_no_llm_needs_only_the_vanilla_model(tmp_path):
    res = CliRunner().invoke(app, ["serve", "--config", "serve/mer.yaml", "--models", str(tmp_path), "--no-llm", "--exit"])
    assert res.exit_code == 1
    assert "vanilla/vanilla.json" in res.output and "fusion" not in res.output.split("Make them with")[0]


def test_every_command_with_config_takes_set():
    import typer.main

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), {o for p in cmd.params for o in p.opts}

    with_config = {name: opts for name, opts in walk(typer.main.get_command(app), ["mer"]) if "--config" in opts}
    assert len(with_config) >= 7, sorted(with_config)
    assert [n for n, opts in with_config.items() if "--set" not in opts] == []
