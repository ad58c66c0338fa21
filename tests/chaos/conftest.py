"""The multi-node test cluster of the chaos suite: a head with no CPUs (the driver's node) and two
worker nodes of one CPU each, on this machine (``mer_ray.bench.chaos_cluster.start_cluster``)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh 1 + 2 node cluster per test module, this process attached as its driver."""
    import ray

    from mer_ray.bench.chaos_cluster import start_cluster, stop_cluster

    if ray.is_initialized():
        ray.shutdown()
    c = start_cluster(n_workers=2, worker_cpus=1.0, head_cpus=0.0)
    yield c
    stop_cluster(c)
