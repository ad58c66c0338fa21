"""The layout's rules, checked on the source: imports run one way, with no cycle (function-local
imports and the stage registry's string imports included); model code has no Ray or DeepSpeed;
production never imports the demo or the benchmarks; Ray starts in one place; no repo walking."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "mer_ray"
STRING_IMPORT = re.compile(r"^(mer_ray(?:\.\w+)+):\w+$")  # "mer_ray.features.decode:DecodeStage"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(mod: str) -> tuple[set[str], set[str]]:
    """(mer_ray modules, top-level external packages) that ``mod`` imports anywhere in its body."""
    tree = ast.parse(MODULES[mod].read_text())
    internal, external = set(), set()
    is_pkg = MODULES[mod].name == "__init__.py"
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and STRING_IMPORT.match(node.value):
            names = [STRING_IMPORT.match(node.value).group(1)]
        for n in names:
            if n.split(".")[0] == "mer_ray":
                r = _resolve(n)
                if r and r != mod:
                    internal.add(r)
            else:
                external.add(n.split(".")[0])
    return internal, external


GRAPH = {m: imports_of(m)[0] for m in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def closure(mod: str) -> set[str]:
    seen, todo = set(), [mod]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += GRAPH[m]
    return seen


def test_the_checker_sees_local_string_and_relative_imports():
    assert "mer_ray.features.decode" in GRAPH["mer_ray.features.stages"]  # by string
    assert "mer_ray.lantern.fit" in GRAPH["mer_ray.lantern.predict"]
    assert len(MODULES) > 60


def test_no_import_cycle():
    assert _cycles() == []


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.endswith(".model")))
def test_model_code_is_plain_pytorch(mod):
    external = set().union(*(imports_of(m)[1] for m in closure(mod)))
    assert not {"ray", "deepspeed"} & external, f"{mod} reaches {sorted({'ray', 'deepspeed'} & external)}"


def test_production_never_imports_demo_or_bench():
    leaves = ("mer_ray.demo", "mer_ray.bench")
    for mod, deps in GRAPH.items():
        if mod.startswith(leaves) or mod == "mer_ray.cli":
            continue
        bad = sorted(d for d in deps if d.startswith(leaves))
        assert not bad, f"{mod} imports {bad}"


def test_only_the_root_cli_imports_area_clis():
    for mod, deps in GRAPH.items():
        if mod in ("mer_ray.cli", "mer_ray.__main__"):
            continue
        bad = sorted(d for d in deps if d.endswith(".cli"))
        assert not bad, f"{mod} imports {bad}"


def test_ray_starts_only_in_runtime():
    for mod, path in MODULES.items():
        if mod != "mer_ray.runtime":
            assert "ray.init(" not in path.read_text(), f"{mod} starts Ray; use mer_ray.runtime.start_ray"


def test_no_repo_walking_and_no_shared_default():
    for mod, path in MODULES.items():
        src = path.read_text()
        assert not re.search(r"parents\[\d\]", src), f"{mod} walks up from __file__"
        assert "../shared" not in src, f"{mod} defaults to ../shared (use --data-dir or MER_MELD_DIR)"


def test_module_names_are_unique_within_roles():
    """No two modules share a base name for different things, except the per-capability roles."""
    roles = {"__init__", "__main__", "cli", "config", "model", "train", "predict", "artifacts", "job", "recipe"}
    seen: dict[str, str] = {}
    for mod, path in MODULES.items():
        base = mod.rsplit(".", 1)[-1]
        if base in roles or mod == "mer_ray" or mod.startswith("mer_ray.bench.") or path.name == "__init__.py":
            continue  # bench/<area>.py is the benchmark of that area, by convention; a package names a capability
        assert base not in seen, f"{mod} and {seen[base]} share the name {base!r}"
        seen[base] = mod


ARTIFACT_FILES = {"vanilla": {"model.pt", "vanilla.json", "state.json", "optim.pt"}, "lantern": {"fusion.json", "fusion.pt"},
                  "mllm": {"mer_mllm.json", "projectors.safetensors"}}


def test_only_each_areas_artifacts_module_names_its_model_files():
    """A model's file names appear as code (not docs or help) in its ``artifacts.py`` alone."""
    owners = {name: f"mer_ray.{area}.artifacts" for area, names in ARTIFACT_FILES.items() for name in names}
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                owner = owners.get(node.value.rsplit("/", 1)[-1])
                assert owner is None or mod == owner, f"{mod} names {node.value!r}: use {owner}"
