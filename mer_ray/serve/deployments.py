"""Serve deployments: thin wrappers around the plain member objects (see ``members.py``).

Each deployment loads its member once in ``__init__`` and exposes the member's
methods. Resources and autoscaling come from ``serve/*.yaml`` (the defaults here
suit a laptop); model replicas pin ``torch.set_num_threads`` so fractional CPUs
do not oversubscribe the cores.
"""

from __future__ import annotations

from ray import serve

from mer_ray.serve.ensemble_run import EnsembleFusionMember, FinetunedMember, SeedAverageMember, is_ensemble_run, run_refiner
from mer_ray.serve.featurize import RequestFeaturizer
from mer_ray.serve.members import FusionMember, MLLMMember, RefinerMember, VanillaMember


@serve.deployment(name="Featurizer", ray_actor_options={"num_cpus": 0.5})
class Featurizer:
    """Text embeddings (packaged MiniLM), plus face/voice features when media are sent."""

    def __init__(self, threads: int = 1, extract_config: dict | None = None):
        self.member = RequestFeaturizer(threads=threads, extract_config=extract_config)

    def featurize(self, utterances: list[dict]) -> list[dict]:
        return self.member.featurize(utterances)


@serve.deployment(name="Vanilla", ray_actor_options={"num_cpus": 0.5})
class Vanilla:
    """The vanilla multi-task model (``<models>/vanilla``), or an ``mer ensemble`` run's seed average."""

    def __init__(self, models_dir: str, threads: int = 1):
        member = SeedAverageMember if is_ensemble_run(models_dir) else VanillaMember
        self.member = member(models_dir, threads)

    def label_set_name(self) -> str:
        return self.member.label_set_name()

    def predict(self, rows: list[dict]):
        return self.member.predict(rows)


@serve.deployment(name="LLMRefiner", ray_actor_options={"num_cpus": 1})
class LLMRefiner:
    """Lantern's LLM prompting per receptive field (llama.cpp in the replica, or an HTTP server)."""

    def __init__(self, models_dir: str, llm: dict, threads: int = 1):
        member = run_refiner if is_ensemble_run(models_dir) else RefinerMember  # a run: its prompt job's settings
        self.member = member(models_dir, llm, threads)

    def refine(self, rows: list[dict], vanilla, targets: list[int]) -> dict:
        return self.member.refine(rows, vanilla, targets)


@serve.deployment(name="Fusion", ray_actor_options={"num_cpus": 0.25})
class Fusion:
    """Receptive-field-aware attention fusion (``<models>/fusion``)."""

    def __init__(self, models_dir: str, threads: int = 1):
        self.member = FusionMember(models_dir, threads)

    def fuse(self, vanilla, refined: dict):
        return self.member.fuse(vanilla, refined)


@serve.deployment(name="MLLM", ray_actor_options={"num_cpus": 1})
class MLLM:
    """The fine-tuned multimodal LLM (``<models>/mllm``), one more ensemble member."""

    def __init__(self, models_dir: str, threads: int = 1):
        self.member = MLLMMember(models_dir, threads)

    def predict(self, rows: list[dict]):
        return self.member.predict(rows)


@serve.deployment(name="FinetunedLLM", ray_actor_options={"num_cpus": 1})
class FinetunedLLM:
    """One fine-tuned LLM member of an ``mer ensemble`` run (bound once per member, each its own deployment)."""

    def __init__(self, models_dir: str, name: str, threads: int = 1):
        self.member = FinetunedMember(models_dir, name, threads)

    def predict(self, rows: list[dict], vanilla_avg):
        return self.member.predict(rows, vanilla_avg)


@serve.deployment(name="EnsembleFusion", ray_actor_options={"num_cpus": 0.25})
class EnsembleFusion:
    """The fitted fusion of an ``mer ensemble`` run (``report/fusion/``), as ``mer predict ensemble`` applies it."""

    def __init__(self, models_dir: str, threads: int = 1):
        self.member = EnsembleFusionMember(models_dir, threads)

    def fuse(self, seeds: dict, members: dict, refined):
        return self.member.fuse(seeds, members, refined)
