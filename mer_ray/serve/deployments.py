"""Serve deployments: thin wrappers around the plain member objects (see ``members.py``).

Each deployment loads its member once in ``__init__`` and exposes the member's
methods. Resources and autoscaling come from ``serve/*.yaml`` (the defaults here
suit a laptop); model replicas pin ``torch.set_num_threads`` so fractional CPUs
do not oversubscribe the cores.

The text models batch across concurrent requests (``Featurizer``, ``Vanilla`` and the
co-located ``FeaturizerVanilla``): callers still send one dialogue per call, and
``@serve.batch`` hands the member a list of dialogues (one MiniLM pass, one vanilla
forward pass per batch). ``max_batch_size`` and ``batch_wait_timeout_s`` are the
deployment's ``user_config`` in the YAML (:class:`BatchSettings`, applied by
``reconfigure``). The LLM deployments never merge requests (docs/lantern.md).

Every deployment's ``check_health`` runs its model on one tiny fixed input, so a
wedged replica fails its health check and Serve replaces it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import RayServeException

from mer_ray.serve.ensemble_run import EnsembleFusionMember, FinetunedMember, SeedAverageMember, is_ensemble_run, run_refiner
from mer_ray.serve.featurize import RequestFeaturizer
from mer_ray.serve.members import FusionMember, MLLMMember, RefinerMember, VanillaMember

#: Deployments that batch, so take a ``user_config`` (:class:`BatchSettings`).
BATCHED = ("Featurizer", "Vanilla", "FeaturizerVanilla")


class BatchSettings(BaseModel):
    """A batched deployment's ``user_config`` in ``serve/*.yaml`` (unknown keys refused)."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(16, ge=1)
    """Most dialogues in one batch (keep ``max_ongoing_requests`` at least this, or batches never fill)."""
    batch_wait_timeout_s: float = Field(0.002, ge=0)
    """How long the first dialogue of a batch waits for more; a long wait would only delay a lone request."""
    max_concurrent_batches: int = Field(4, ge=1)
    """Batches running at once (in threads). Ray 2.60's ``@serve.batch`` forms a batch as soon as one request
    is queued and only then waits for this semaphore (``_BatchQueue._process_batches``), so with 1 every
    batch under load was one dialogue and they ran one after another: 12.6 requests/s against 17-18 for
    the unbatched replica (docs/serve.md). Set when the replica starts (``reconfigure`` rebuilds the queues)."""


class BatchStats:
    """Cumulative batch counts since the replica started: ``{"calls", "items", "max"}``."""

    def __init__(self):
        self.calls = self.items = self.max = 0

    def record(self, n: int) -> None:
        self.calls, self.items, self.max = self.calls + 1, self.items + n, max(self.max, n)

    def as_dict(self) -> dict[str, int]:
        return {"calls": self.calls, "items": self.items, "max": self.max}


def _vanilla_member(models_dir: str, threads: int):
    member = SeedAverageMember if is_ensemble_run(models_dir) else VanillaMember
    return member(models_dir, threads)


def _unwrap(out):
    """A batched member's answer for one request: the value, or that request's own exception raised."""
    if isinstance(out, BaseException):
        raise out
    return out


async def _health(probe: Callable[[], None], what: str) -> None:
    """``probe`` off the event loop; a failure is a ``RuntimeError`` naming the deployment (Serve marks it unhealthy)."""
    try:
        await asyncio.to_thread(probe)
    except RuntimeError:
        raise
    except Exception as e:
        raise RuntimeError(f"{what}: the health probe failed: {e!r}") from e


class _Batched:
    """Per-replica ``@serve.batch`` queues over a plain member's list-in, list-out methods.

    The queues are made per instance rather than on the class, because Serve keeps one queue per decorated
    function and runs a batch with its first item's ``self``: two instances in one process would share it.
    Outside a replica (local testing mode, plain use) each call is a batch of one, through the same code.
    """

    def _init_batching(self, **methods: Callable[[list], list]) -> None:
        self.stats, self.settings = BatchStats(), BatchSettings()
        self.batched, self.unbatched = {}, {}
        for name, fn in methods.items():
            async def run(items: list, fn=fn) -> list:
                self.stats.record(len(items))
                return await asyncio.to_thread(fn, items)  # off the loop: the next batch keeps filling meanwhile

            run.__name__ = name
            self.unbatched[name] = run
        self._decorate()
        try:  # Serve's batch queue needs a replica context, which local testing mode does not set (Ray 2.60)
            serve.get_replica_context()
            self.in_replica = True
        except RayServeException:
            self.in_replica = False

    async def _one(self, name: str, item):
        """One request through the batch queue (outside a replica: a batch of one), its own answer or exception."""
        if self.in_replica:
            return _unwrap(await self.batched[name](item))
        return _unwrap((await self.unbatched[name]([item]))[0])

    def _decorate(self) -> None:
        # fresh @serve.batch wrappers: max_concurrent_batches can only be given at decoration (the queue is made on
        # the first call, so a replica reconfigured before traffic, as Serve does at start, gets it)
        s = self.settings
        self.batched = {name: serve.batch(max_batch_size=s.max_batch_size, batch_wait_timeout_s=s.batch_wait_timeout_s,
                                          max_concurrent_batches=s.max_concurrent_batches)(run)
                        for name, run in self.unbatched.items()}

    def reconfigure(self, config: dict) -> None:
        """Apply the YAML's ``user_config`` (:class:`BatchSettings`) to every batched method of this replica."""
        self.settings = BatchSettings.model_validate(config or {})
        self._decorate()

    def batch_stats(self) -> dict[str, int]:
        """``{"calls", "items", "max"}`` since start: batches run, dialogues in them, the largest batch."""
        return self.stats.as_dict()


@serve.deployment(name="Featurizer", ray_actor_options={"num_cpus": 0.5})
class Featurizer(_Batched):
    """Text embeddings (packaged MiniLM), plus face/voice features when media are sent; batched."""

    def __init__(self, threads: int = 1, extract_config: dict | None = None):
        self.member = RequestFeaturizer(threads=threads, extract_config=extract_config)
        self._init_batching(featurize=self.member.featurize_batch)

    async def featurize(self, utterances: list[dict]) -> list[dict]:
        return await self._one("featurize", utterances)

    async def check_health(self) -> None:
        await _health(self.member.probe, "Featurizer")


@serve.deployment(name="Vanilla", ray_actor_options={"num_cpus": 0.5})
class Vanilla(_Batched):
    """The vanilla multi-task model (``<models>/vanilla``), or an ``mer ensemble`` run's seed average; batched."""

    def __init__(self, models_dir: str, threads: int = 1):
        self.member = _vanilla_member(models_dir, threads)
        self._init_batching(predict=self.member.predict_batch)

    def label_set_name(self) -> str:
        return self.member.label_set_name()

    async def predict(self, rows: list[dict]):
        return await self._one("predict", rows)

    async def check_health(self) -> None:
        await _health(self.member.probe, "Vanilla")


@serve.deployment(name="FeaturizerVanilla", ray_actor_options={"num_cpus": 0.75})
class FeaturizerVanilla(_Batched):
    """The Featurizer and the Vanilla model in one replica: one hop, ``featurize_predict`` -> (rows, vanilla).

    It composes the same plain members as ``Featurizer`` and ``Vanilla`` (which still exist and scale apart in
    the ``split`` layout); ``featurize`` and ``predict`` stay for streaming sessions, which featurize one turn
    and predict over the stored context.
    """

    def __init__(self, models_dir: str, threads: int = 1, extract_config: dict | None = None):
        self.featurizer = RequestFeaturizer(threads=threads, extract_config=extract_config)
        self.vanilla = _vanilla_member(models_dir, threads)
        self._init_batching(featurize=self.featurizer.featurize_batch, predict=self.vanilla.predict_batch,
                            featurize_predict=self._featurize_predict_batch)

    def _featurize_predict_batch(self, dialogues: list[list[dict]]) -> list:
        """``[D]`` of ``(rows, vanilla answer)``: one MiniLM pass and one vanilla pass over the batch."""
        rows = self.featurizer.featurize_batch(dialogues)
        ok = [k for k, r in enumerate(rows) if not isinstance(r, Exception)]
        van = self.vanilla.predict_batch([rows[k] for k in ok]) if ok else []
        out: list = list(rows)
        for k, v in zip(ok, van):
            out[k] = v if isinstance(v, Exception) else (rows[k], v)
        return out

    def label_set_name(self) -> str:
        return self.vanilla.label_set_name()

    async def featurize(self, utterances: list[dict]) -> list[dict]:
        return await self._one("featurize", utterances)

    async def predict(self, rows: list[dict]):
        return await self._one("predict", rows)

    async def featurize_predict(self, utterances: list[dict]) -> tuple[list[dict], dict]:
        return await self._one("featurize_predict", utterances)

    async def check_health(self) -> None:
        await _health(self.featurizer.probe, "FeaturizerVanilla")
        await _health(self.vanilla.probe, "FeaturizerVanilla")


@serve.deployment(name="LLMRefiner", ray_actor_options={"num_cpus": 1})
class LLMRefiner:
    """Lantern's LLM prompting per receptive field (llama.cpp in the replica, or an HTTP server); never batched."""

    def __init__(self, models_dir: str, llm: dict, threads: int = 1):
        member = run_refiner if is_ensemble_run(models_dir) else RefinerMember  # a run: its prompt job's settings
        self.member = member(models_dir, llm, threads)

    def refine(self, rows: list[dict], vanilla, targets: list[int]) -> dict:
        return self.member.refine(rows, vanilla, targets)

    async def check_health(self) -> None:
        await _health(self.member.probe, "LLMRefiner")


@serve.deployment(name="Fusion", ray_actor_options={"num_cpus": 0.25})
class Fusion:
    """Receptive-field-aware attention fusion (``<models>/fusion``)."""

    def __init__(self, models_dir: str, threads: int = 1):
        self.member = FusionMember(models_dir, threads)

    def fuse(self, vanilla, refined: dict):
        return self.member.fuse(vanilla, refined)

    async def check_health(self) -> None:
        await _health(self.member.probe, "Fusion")


@serve.deployment(name="MLLM", ray_actor_options={"num_cpus": 1})
class MLLM:
    """The fine-tuned multimodal LLM (``<models>/mllm``), one more ensemble member."""

    def __init__(self, models_dir: str, threads: int = 1):
        self.member = MLLMMember(models_dir, threads)

    def predict(self, rows: list[dict]):
        return self.member.predict(rows)

    async def check_health(self) -> None:
        await _health(self.member.probe, "MLLM")


@serve.deployment(name="FinetunedLLM", ray_actor_options={"num_cpus": 1})
class FinetunedLLM:
    """One fine-tuned LLM member of an ``mer ensemble`` run (bound once per member, each its own deployment)."""

    def __init__(self, models_dir: str, name: str, threads: int = 1):
        self.member = FinetunedMember(models_dir, name, threads)

    def predict(self, rows: list[dict], vanilla_avg):
        return self.member.predict(rows, vanilla_avg)

    async def check_health(self) -> None:
        await _health(self.member.probe, f"FinetunedLLM_{self.member.name}")


@serve.deployment(name="EnsembleFusion", ray_actor_options={"num_cpus": 0.25})
class EnsembleFusion:
    """The fitted fusion of an ``mer ensemble`` run (``report/fusion/``), as ``mer predict ensemble`` applies it."""

    def __init__(self, models_dir: str, threads: int = 1):
        self.member = EnsembleFusionMember(models_dir, threads)

    def fuse(self, seeds: dict, members: dict, refined):
        return self.member.fuse(seeds, members, refined)

    async def check_health(self) -> None:
        await _health(self.member.probe, "EnsembleFusion")
