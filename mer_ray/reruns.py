"""Re-running what a Ray Data job has not finished after a node, an actor or a worker is lost.

A lost node, worker or block fails the whole Ray Data run with a Ray error. The batch jobs
(``mer extract``, the Lantern prompt job) write their output in atomic parts, so the driver re-runs
only what is not on disk yet, with new actor pools sized to the CPUs left, up to
:data:`MAX_ATTEMPTS` runs in all. Nothing is duplicated (a part is written once) and nothing is lost
(a run ends with every part written, or raises). Ray's own actor restarts are off
(:data:`ACTOR_FT`): on Ray 2.60, removing a node under a pool with restarts on either failed the run
with ``ActorUnavailableError`` or hung it for good (a restarted actor, blocks lost with the node),
as measured in ``tests/chaos/test_extract_faults.py`` (docs/fault_tolerance.md).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable

#: Ray Data ``map_batches`` options of the batch jobs' actor pools: no Ray-level restarts (see above).
ACTOR_FT = {"max_restarts": 0}
#: Runs in all, the first included.
MAX_ATTEMPTS = 4
#: Seconds to wait before re-run k (times k): Ray takes ~15 s to declare a lost node dead, and a re-run
#: started before that may place an actor on it and fail again (seen: ``ActorDiedError`` on the 2nd run).
RETRY_BACKOFF_S = 5.0
#: Seconds to fetch one finished block. A block is fetched once its task is done, so this only bounds a
#: block lost with its node: Ray 2.60's ``iter_batches`` was seen to wait on such a block for good after
#: the run had already failed.
BLOCK_GET_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


def retriable_errors() -> tuple[type[BaseException], ...]:
    """The Ray errors after which re-running the unfinished work can succeed (imported late: Ray is heavy)."""
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ObjectLostError, rex.NodeDiedError, rex.WorkerCrashedError, rex.OwnerDiedError,
            rex.GetTimeoutError)


def fetch_blocks(ray, ds):
    """The dataset's output blocks, in the order they finish, each fetched with :data:`BLOCK_GET_TIMEOUT_S`."""
    for bundle in ds.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            yield ray.get(entry.ref, timeout=BLOCK_GET_TIMEOUT_S)


def run_with_reruns(run_left: Callable[[int], None], retried: dict, what: str) -> None:
    """``run_left(attempt)`` for attempt 1, 2, ... until one returns without a retriable Ray error.

    ``run_left`` runs whatever is not on disk yet (nothing, when a previous run got it all). Each failure
    is recorded in ``retried["errors"]``; the failed run's actor handles are dropped (``gc.collect``) so its
    actors exit and free their CPUs before the next run is placed.

    Raises:
        The last Ray error, after :data:`MAX_ATTEMPTS` failed runs.
    """
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            run_left(attempt)
            return
        except retriable_errors() as e:
            retried["errors"].append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            gc.collect()
            if attempt == MAX_ATTEMPTS:
                raise
            log.warning("%s: run %d lost a worker (%s); re-running what is not written yet", what, attempt, type(e).__name__)
            time.sleep(RETRY_BACKOFF_S * attempt)
