"""Every shipped YAML in jobs/ loads against its entry point, and its header names the exact command.

Convention (all areas): a jobs/*.yaml starts with comment lines, one of which is the command that
runs it, either ``... python jobs/<entry>.py ... --config jobs/<this>.yaml ...`` (the entry module
exports ``load_config(path)`` that validates the file) or ``mer <subcommand> ... --config
jobs/<this>.yaml`` (the subcommand must exist and take ``--config``; its validating loader is listed
in ``MER_LOADERS``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parents[1] / "jobs"
YAMLS = sorted(JOBS.glob("*.yaml")) + sorted(JOBS.glob("*.yml"))


def _header(path: Path) -> list[str]:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return lines


def _lantern(cls_name: str):
    def load(path: str):
        from mer_ray.lantern import config

        return config.load_config(getattr(config, cls_name), path)

    return load


#: Validating loaders of `mer` subcommands whose YAML headers name them.
MER_LOADERS = {"lantern prompt": _lantern("PromptJobConfig"), "lantern fuse": _lantern("FuseConfig")}


def _entry(path: Path) -> tuple[str, str]:
    """("python", entry path) or ("mer", subcommand words) from the header."""
    for line in _header(path):
        m = re.search(r"python (jobs/[\w./-]+\.py)\b.*--config (jobs/[\w./-]+\.ya?ml)", line)
        if m:
            assert m.group(2) == f"jobs/{path.name}", f"{path.name}: header command runs {m.group(2)}, not itself"
            return "python", m.group(1)
        m = re.search(r"--config (jobs/[\w./-]+\.ya?ml)", line)
        if line.startswith("mer ") and m:
            assert m.group(1) == f"jobs/{path.name}", f"{path.name}: header command runs {m.group(1)}, not itself"
            words = []
            for w in line.split()[1:]:
                if w.startswith("-"):
                    break
                words.append(w)
            return "mer", " ".join(words)
    raise AssertionError(f"{path.name}: no header line with 'python jobs/<entry>.py ... --config jobs/{path.name}' "
                         f"or 'mer <subcommand> ... --config jobs/{path.name}'")


def test_jobs_have_yaml():
    assert YAMLS, f"no YAML configs in {JOBS}"


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_loads_against_its_entry_point(path: Path):
    kind, target = _entry(path)
    if kind == "mer":
        import typer.main
        import yaml

        from mer_ray.cli import app

        cmd = typer.main.get_command(app)
        for word in target.split():
            assert hasattr(cmd, "commands") and word in cmd.commands, f"{path.name}: `mer {target}` is not a command"
            cmd = cmd.commands[word]
        assert any("--config" in p.opts for p in cmd.params), f"{path.name}: `mer {target}` takes no --config"
        assert isinstance(yaml.safe_load(path.read_text()), dict), f"{path.name} is not a YAML mapping"
        if target in MER_LOADERS:
            assert MER_LOADERS[target](str(path)) is not None
        return
    entry = JOBS.parent / target
    assert entry.exists(), f"{path.name}: entry point {entry} does not exist"
    spec = importlib.util.spec_from_file_location(f"_jobs_{entry.stem}", entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # entry points keep heavy imports inside main()
    assert hasattr(module, "load_config"), f"{entry} exports no load_config(path)"
    cfg = module.load_config(str(path))
    assert cfg is not None
