"""Every shipped YAML in jobs/ loads against its entry point, and its header names the exact command.

Convention (all areas): a jobs/*.yaml starts with comment lines, one of which is the command that
runs it, ``... python jobs/<entry>.py ... --config jobs/<this>.yaml ...``; the entry module exports
``load_config(path)`` that validates the file.
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


def _entry(path: Path) -> Path:
    for line in _header(path):
        m = re.search(r"python (jobs/[\w./-]+\.py)\b.*--config (jobs/[\w./-]+\.ya?ml)", line)
        if m:
            assert m.group(2) == f"jobs/{path.name}", f"{path.name}: header command runs {m.group(2)}, not itself"
            return JOBS.parent / m.group(1)
    raise AssertionError(f"{path.name}: no header line with 'python jobs/<entry>.py ... --config jobs/{path.name}'")


def test_jobs_have_yaml():
    assert YAMLS, f"no YAML configs in {JOBS}"


@pytest.mark.parametrize("path", YAMLS, ids=[p.name for p in YAMLS])
def test_yaml_loads_against_its_entry_point(path: Path):
    entry = _entry(path)
    assert entry.exists(), f"{path.name}: entry point {entry} does not exist"
    spec = importlib.util.spec_from_file_location(f"_jobs_{entry.stem}", entry)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # entry points keep heavy imports inside main()
    assert hasattr(module, "load_config"), f"{entry} exports no load_config(path)"
    cfg = module.load_config(str(path))
    assert cfg is not None
