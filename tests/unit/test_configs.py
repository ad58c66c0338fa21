"""Every shipped YAML (jobs/ and serve/) names the command that runs it on its first line, and
loads through the one config loader against that command's config class (unknown keys refused)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from mer_ray.config import ConfigError, load

REPO = Path(__file__).resolve().parents[2]
YAMLS = sorted(p.relative_to(REPO).as_posix() for d in ("jobs", "serve") for p in (REPO / d).glob("*.y*ml"))


def _mer_classes() -> dict[str, type]:
    from mer_ray.ensemble.config import EnsembleConfig
    from mer_ray.lantern.config import FuseConfig, PromptJobConfig
    from mer_ray.mllm.config import FinetuneConfig
    from mer_ray.serve.config import ServeConfig
    from mer_ray.vanilla.recipe import PipelineConfig

    return {"lantern prompt": PromptJobConfig, "lantern fuse": FuseConfig, "finetune": FinetuneConfig,
            "pipeline": PipelineConfig, "train": PipelineConfig, "serve": ServeConfig, "bench serve": ServeConfig,
            "ensemble": EnsembleConfig}


def _command(rel: str) -> list[str]:
    first = (REPO / rel).read_text().splitlines()[0]
    assert first.startswith("# "), f"{rel}: the first line must be the command that runs it, got {first!r}"
    argv = shlex.split(first[2:])
    assert rel in argv, f"{rel}: its first line does not name the file itself: {first!r}"
    return argv


def _args(rel: str) -> dict:
    """A Serve YAML holds its ServeConfig as the one application's ``args``; a job YAML is the config."""
    from mer_ray.serve.builder import read_serve_yaml

    return read_serve_yaml(REPO / rel)[1].get("args") or {} if rel.startswith("serve/") else None


def test_every_directory_ships_yaml():
    assert {r.split("/")[0] for r in YAMLS} == {"jobs", "serve"}


#: A config-only file: no machine here can run it, so its first line says so and names the test that builds it.
_NO_COMMAND = re.compile(r"^# no command runs this file here \(.+\): (tests/\S+\.py) builds its config")


@pytest.mark.parametrize("rel", YAMLS)
def test_first_line_is_the_command_and_the_file_loads_against_it(rel):
    m = _NO_COMMAND.match((REPO / rel).read_text().splitlines()[0])
    if m:  # the named test must exist and read this very file
        assert rel.split("/")[-1] in (REPO / m.group(1)).read_text(), f"{rel}: {m.group(1)} does not load it"
        return
    argv = _command(rel)
    if "python" in argv:  # ray job submit ... -- python jobs/<entry>.py --config <rel>
        entry = argv[argv.index("python") + 1]
        assert argv[argv.index("--config") + 1] == rel
        spec = importlib.util.spec_from_file_location(f"_entry_{Path(entry).stem}", REPO / entry)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # entry points keep heavy imports inside main()
        cfg = load(module.CONFIG, REPO / rel)
    elif argv[0] == "mer":
        import typer.main

        from mer_ray.cli import app

        words = [w for w in argv[1:3] if not w.startswith("-")]
        words = words if " ".join(words) in _mer_classes() else words[:1]
        cmd = typer.main.get_command(app)
        for w in words:
            cmd = cmd.commands[w]
        opts = {o for p in cmd.params for o in p.opts}
        assert {"--config", "--set"} <= opts, f"`mer {' '.join(words)}` must take --config and --set"
        source = _args(rel) if rel.startswith("serve/") else REPO / rel
        cfg = load(_mer_classes()[" ".join(words)], source)
    else:  # serve deploy / serve run: Ray's own CLI on the app's args
        assert argv[0] == "serve" and argv[1] in ("deploy", "run")
        from mer_ray.serve.config import ServeConfig

        cfg = load(ServeConfig, _args(rel))
    assert cfg is not None


def test_a_typo_in_a_shipped_yaml_is_an_error_that_names_key_and_file(tmp_path):
    from mer_ray.lantern.config import PromptJobConfig

    bad = tmp_path / "lantern_prompt.yaml"
    bad.write_text((REPO / "jobs/lantern_prompt.yaml").read_text().replace("stride:", "strid:"))
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + ".*strid: unknown key"):
        load(PromptJobConfig, bad)
    with pytest.raises(ConfigError, match="backend.engine.n_tread: unknown key"):
        load(PromptJobConfig, REPO / "jobs/lantern_prompt.yaml", ["backend.n_tread=2"])


def test_dotted_overrides_reach_nested_keys_and_parse_as_yaml():
    from mer_ray.vanilla.recipe import PipelineConfig

    cfg = load(PipelineConfig, REPO / "jobs/vanilla_meld.yaml", ["train.epochs=3", "seeds=[5, 6]", ("predict_threads", 1)])
    assert cfg.train.epochs == 3 and cfg.seeds == [5, 6] and cfg.predict_threads == 1


def test_a_set_null_turns_a_field_off_while_an_unset_option_is_skipped():
    from mer_ray.ensemble.config import EnsembleConfig

    cfg = load(EnsembleConfig, REPO / "jobs/ensemble_meld.yaml", ["lantern_farcer=null", ("farcer", None)])
    assert cfg.lantern_farcer is None  # the user's --set ...=null is a value
    assert cfg.farcer == "jobs/finetune_farcer_meld.yaml"  # a CLI option left unset (None) changes nothing
