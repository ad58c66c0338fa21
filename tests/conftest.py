"""Shared fixtures. Tests never attach to a Ray cluster left running on the machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# A bare ray.init() would attach to a cluster started by `ray start`; never do that.
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]
# The suite reads MELD from $MER_MELD_DIR, else from ../shared beside the checkout (how CI lays it out).
MELD_DIR = Path(os.environ.get("MER_MELD_DIR") or REPO.parent / "shared" / "data" / "meld")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def meld_dir() -> Path:
    if not (MELD_DIR / "train_sent_emo.csv").exists():
        pytest.skip(f"MELD text not found at {MELD_DIR}")
    return MELD_DIR


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray instance started by the test session (never an existing cluster)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
    )
    yield ray
    ray.shutdown()
