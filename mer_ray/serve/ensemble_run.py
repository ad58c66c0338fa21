"""Serving an ``mer ensemble`` run directory exactly as it was measured.

The layout is what ``mer ensemble`` writes (see :mod:`mer_ray.ensemble.predict`):
``vanilla/models/vanilla/seed*/``, the Lantern prompt job ``lantern/job.json``,
the fine-tuned LLM members (``farcer/``, ``lantern_farcer/``) and the fitted
fusion ``report/fusion/ensemble_fusion.json`` (+ ``.pt``). The members here are
plain objects (Serve deployments wrap them, tests call them directly); the
fusion itself is :func:`mer_ray.ensemble.predict.apply_fusion`, the function
``mer predict ensemble`` applies, so a served dialogue and a predicted corpus
go through the same code.

Shapes: ``n`` utterances, ``C`` labels in the fusion config's label order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mer_ray.serve.members import EngineLock

if TYPE_CHECKING:
    import pyarrow as pa

#: Where an ensemble run keeps each part, relative to its root (the names the missing-model check reports).
VANILLA_DIR = Path("vanilla") / "models" / "vanilla"
FUSION_DIR = Path("report") / "fusion"
LANTERN_JOB = Path("lantern") / "job.json"
#: The dialogue id the fusion sees for a served request (any id works: one dialogue per request).
REQUEST_ID = "request"


def fusion_config_path(models_dir: str | Path) -> Path:
    from mer_ray.ensemble.artifacts import CONFIG_FILE

    return Path(models_dir) / FUSION_DIR / CONFIG_FILE


def is_ensemble_run(models_dir: str | Path) -> bool:
    """True when ``models_dir`` is an ``mer ensemble`` run (its fusion config, or at least its vanilla seeds)."""
    root = Path(models_dir)
    return fusion_config_path(root).exists() or any((root / VANILLA_DIR).glob("seed*"))


def fusion_config(models_dir: str | Path) -> dict:
    """The ensemble fusion config (empty while the run has not fitted it)."""
    from mer_ray.ensemble.artifacts import read_ensemble_config

    return read_ensemble_config(Path(models_dir) / FUSION_DIR)


def uses_llm(cfg: dict) -> bool:
    """Whether the fitted fusion reads any LLM (False: it selected the vanilla seed average)."""
    return bool(cfg) and cfg.get("mode") != "vanilla" and bool(cfg.get("lantern") or cfg.get("members"))


def check_run(models_dir: str | Path, llm: bool) -> list[str]:
    """The files of an ensemble run that serving needs and are missing (empty: all there)."""
    from mer_ray.ensemble.artifacts import WEIGHTS_FILE
    from mer_ray.mllm.artifacts import META_FILE as MLLM_META
    from mer_ray.vanilla.artifacts import META_FILE as VANILLA_META

    root = Path(models_dir)
    seeds = sorted((root / VANILLA_DIR).glob("seed*"))
    missing = [f"{root / VANILLA_DIR}/seed0/{VANILLA_META}"] if not seeds else [
        f"{s}/{VANILLA_META}" for s in seeds if not (s / VANILLA_META).exists()]
    cfg = fusion_config(root)
    have = {n for s in seeds for n in (s.name, f"vanilla_{s.name}")}
    missing += [f"{root / VANILLA_DIR}/{n.removeprefix('vanilla_')}/{VANILLA_META}"
                for n in cfg.get("vanilla_seeds") or [] if n not in have]  # the fusion averaged these seeds
    if not llm:
        return missing
    if not cfg:
        return [*missing, str(fusion_config_path(root))]
    if not uses_llm(cfg):  # the fusion selected the seed average: nothing else is served
        return missing
    if not (root / FUSION_DIR / WEIGHTS_FILE).exists():
        missing.append(str(root / FUSION_DIR / WEIGHTS_FILE))
    missing += [f"{root / m}/{MLLM_META}" for m in cfg.get("members") or [] if not (root / m / MLLM_META).exists()]
    if cfg.get("lantern") and not (root / LANTERN_JOB).exists():
        missing.append(str(root / LANTERN_JOB))
    return missing


def _seed_dirs(root: Path, cfg: dict) -> list[Path]:
    """The seed directories the fusion averaged (its ``vanilla_seeds``), all seeds when it lists none."""
    from mer_ray.ensemble.predict import EnsembleDir

    seeds = EnsembleDir.open(root, need_fusion=False).seeds
    listed = list(cfg.get("vanilla_seeds") or [])
    if not listed:
        return seeds
    by_name = {n: d for d in seeds for n in (d.name, f"vanilla_{d.name}")}
    lost = [s for s in listed if s not in by_name]
    if lost:
        raise FileNotFoundError(f"{root / VANILLA_DIR}: the fusion averaged seeds {listed}, {lost} are not there")
    return [by_name[s] for s in listed]


class SeedAverageMember:
    """The vanilla input of the ensemble: the mean of the seeds the fusion was fitted with.

    :meth:`predict` answers like :class:`~mer_ray.serve.members.VanillaMember` (``emotion_probs`` is the seed
    mean, so ``use_llm: false`` is the seed average exactly) plus ``seeds`` (each seed's ``[n, C]``, the fusion's
    input) and ``lantern_reference`` (the seed the Lantern job prompted from, the refiner's input).
    """

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.serve.members import _threads, label_set_name
        from mer_ray.vanilla.predict import VanillaPredictor

        _threads(threads)
        root = Path(models_dir)
        cfg = fusion_config(root)
        self.predictors = {d.name: VanillaPredictor.from_dir(d, num_threads=threads) for d in _seed_dirs(root, cfg)}
        first = next(iter(self.predictors.values()))
        self.labels = list(cfg.get("labels") or first.emotion_labels)
        self.name = label_set_name(self.labels, first.meta)
        self.reference = self._reference_seed(root)

    def _reference_seed(self, root: Path) -> str:
        # the job prompted from one seed's predictions (job.json `vanilla`: .../predictions/seed0); as predict.py picks it
        job = root / LANTERN_JOB
        name = Path(json.loads(job.read_text()).get("vanilla") or "").name if job.exists() else ""
        return name if name in self.predictors else next(iter(self.predictors))

    def label_set_name(self) -> str:
        return self.name

    def _ordered(self, p: np.ndarray, labels: list[str]) -> np.ndarray:
        return np.asarray(p, dtype=np.float64)[:, [list(labels).index(lab) for lab in self.labels]]

    def _answer(self, outs: dict[str, dict]) -> dict:
        """Each seed's outputs for one dialogue -> the member's answer."""
        seeds = {f"vanilla_{n}": self._ordered(o["emotion_probs"], self.predictors[n].emotion_labels) for n, o in outs.items()}
        ref, ref_pred = outs[self.reference], self.predictors[self.reference]
        reference = {"emotion_probs": seeds[f"vanilla_{self.reference}"].astype(np.float32),
                     "sentiment_probs": ref.get("sentiment_probs"), "sentiment_labels": ref_pred.sentiment_labels,
                     "vad": ref.get("vad")}
        return {"emotion_probs": np.mean(np.stack(list(seeds.values())), axis=0), "sentiment_probs": ref.get("sentiment_probs"),
                "sentiment_labels": ref_pred.sentiment_labels, "vad": ref.get("vad"), "seeds": seeds,
                "lantern_reference": reference}

    def predict(self, rows: list[dict]) -> dict:
        return self._answer({name: pred.predict_dialogue(rows) for name, pred in self.predictors.items()})

    def predict_batch(self, dialogues: list[list[dict]]) -> list:
        """:meth:`predict` of ``D`` dialogues: per seed one forward pass over all of them (the fine-tuned MiniLM
        encodes every utterance of the batch, length-sorted, in ~1024-token chunks); ``[D]`` answers, a failed
        dialogue holding its exception."""
        from mer_ray.serve.members import isolated, predict_many

        def run(ds):
            per_seed = {name: predict_many(pred, ds) for name, pred in self.predictors.items()}
            return [self._answer({name: outs[k] for name, outs in per_seed.items()}) for k in range(len(ds))]

        return isolated(run, self.predict, dialogues)

    def probe(self) -> None:
        """Every seed on one fixed utterance; ``RuntimeError`` unless the mean is a distribution."""
        from mer_ray.serve.members import PROBE_ROW, check_probs

        check_probs(self.predict([PROBE_ROW])["emotion_probs"], "Vanilla (seed average)")


def refiner_settings(models_dir: str, llm: dict) -> dict:
    """The Lantern refiner of the run: the prompt job's backend, sizes, stride and template (``lantern/job.json``).

    ``llm.model``/``llm.base_url`` still override the backend's (an HTTP server serving the same model elsewhere);
    the prompts themselves are the job's, because the fusion learned features of exactly those.
    """
    job = json.loads((Path(models_dir) / LANTERN_JOB).read_text())
    if job.get("few_shot"):
        raise ValueError(f"{Path(models_dir) / LANTERN_JOB}: few_shot={job['few_shot']} needs MELD train examples, "
                         "which serving does not have; serve this ensemble with --no-llm")
    backend = {k: v for k, v in (job.get("backend") or {}).items() if v is not None}
    backend.update({"n_ctx": llm["n_ctx"], "n_threads": llm["n_threads"]})
    backend.update({k: llm[k] for k in ("model", "base_url") if llm.get(k)})
    return {"backend": backend, "sizes": list(job["sizes"]), "stride": int(job["stride"]), "template": job["template"],
            "chat": bool(backend.pop("chat", True))}


def run_refiner(models_dir: str, llm: dict, threads: int = 1):
    """The :class:`~mer_ray.serve.members.RefinerMember` of the run: the prompt job's settings, the fusion's labels."""
    from mer_ray.serve.members import RefinerMember

    return RefinerMember(models_dir, llm, threads, settings=refiner_settings(models_dir, llm),
                         labels=list(fusion_config(models_dir)["labels"]))


class FinetunedMember:
    """One fine-tuned LLM member of the run (``farcer/``, ``lantern_farcer/``): rows + vanilla mean -> ``[n, C]``.

    A member whose prompt reads references (Lantern x FARCER) gets the seed average, as ``mer predict ensemble``
    gives it; projector features come from the request's rows (none for text-only requests), never zero-filled.
    """

    def __init__(self, models_dir: str, name: str, threads: int = 1, batch_size: int = 4):
        from mer_ray.mllm.artifacts import read_meta
        from mer_ray.mllm.predict import MLLMPredictor
        from mer_ray.serve.members import _threads

        _threads(threads)
        art = Path(models_dir) / name
        self.name = name
        self.predictor = MLLMPredictor.from_dir(art, batch_size=batch_size)
        self.labels = list(fusion_config(models_dir).get("labels") or self.predictor.labels)
        projectors = (read_meta(art).get("model") or {}).get("projectors") or {}
        self.columns = {m: p["feature"] for m, p in projectors.items() if isinstance(p, dict) and p.get("feature")}
        self.perm = [self.labels.index(lab) for lab in self.predictor.labels]  # fusion order -> the member's order
        self.lock = EngineLock()  # requests overlap in Serve's thread pool; one LLM pass at a time

    def _predict(self, rows: list[dict], vanilla_avg) -> np.ndarray:
        feats = [{m: r.get(c) for m, c in self.columns.items() if r.get(c) is not None} for r in rows]
        refs = np.asarray(vanilla_avg, dtype=np.float64)[:, self.perm] if self.predictor.prompt.references else None
        out = np.asarray(self.predictor.predict_dialogue(rows, feats, references=refs)["emotion_probs"], np.float64)
        return out[:, [list(self.predictor.labels).index(lab) for lab in self.labels]]

    def predict(self, rows: list[dict], vanilla_avg) -> np.ndarray:
        with self.lock:
            return self._predict(rows, vanilla_avg)

    def probe(self) -> None:
        """The LLM on one fixed utterance with uniform references, when it is free (see ``EngineLock``)."""
        from mer_ray.serve.members import PROBE_ROW, check_probs

        c = len(self.labels)
        self.lock.probe(lambda: check_probs(self._predict([PROBE_ROW], np.full((1, c), 1.0 / c)), self.name), self.name)


def refined_table(refined: list[list[dict]], content_free) -> pa.Table:
    """The refiner's candidates as a Lantern prompt-job outputs table (what ``apply_fusion`` reads).

    The content-free row is the one the fusion was fitted with (the config's ``content_free``), so calibration
    of a single served dialogue matches the measured run's.
    """
    import pyarrow as pa

    from mer_ray.lantern.queries import CF_DIALOGUE

    rows = [{"dialogue_id": REQUEST_ID, "target_pos": t, "field_start": int(c["start"]), "field_end": int(c["end"]),
             "status": "ok" if c["probs"] is not None else "error",
             "llm_probs": None if c["probs"] is None else [float(x) for x in c["probs"]]}
            for t, cands in enumerate(refined) for c in cands]
    if content_free is not None:
        rows.append({"dialogue_id": CF_DIALOGUE, "target_pos": 0, "field_start": 0, "field_end": 0, "status": "ok",
                     "llm_probs": [float(x) for x in content_free]})
    schema = pa.schema([("dialogue_id", pa.string()), ("target_pos", pa.int64()), ("field_start", pa.int64()),
                        ("field_end", pa.int64()), ("status", pa.string()), ("llm_probs", pa.list_(pa.float32()))])
    return pa.Table.from_pylist(rows, schema=schema)


class EnsembleFusionMember:
    """The run's fitted fusion: seeds + members (+ Lantern's candidates) -> ``[n, C]``, as ``mer predict ensemble``."""

    def __init__(self, models_dir: str, threads: int = 1):
        from mer_ray.ensemble.predict import EnsembleDir
        from mer_ray.serve.members import _threads

        _threads(threads)
        self.ens = EnsembleDir.open(models_dir, need_fusion=True)

    def fuse(self, seeds: dict[str, np.ndarray], members: dict[str, np.ndarray], refined: list[list[dict]] | None) -> np.ndarray:
        from mer_ray.ensemble.predict import apply_fusion

        n = len(next(iter(seeds.values())))
        llm = None if refined is None else refined_table(refined, self.ens.fusion.get("content_free"))
        members = {m: members[m] for m in self.ens.fusion.get("members") or []}  # the fitted order of candidates
        fused, _ = apply_fusion(self.ens, [(REQUEST_ID, i) for i in range(n)], seeds, members, llm)
        return np.asarray(fused, dtype=np.float64)

    def probe(self) -> None:
        """The fitted fusion on one utterance with uniform inputs (every seed, member and a Lantern candidate)."""
        from mer_ray.serve.members import check_probs

        cfg = self.ens.fusion
        c = len(cfg["labels"])
        u = np.full((1, c), 1.0 / c)
        names = cfg.get("vanilla_seeds") or [d.name for d in self.ens.seeds]
        seeds = {n if n.startswith("vanilla_") else f"vanilla_{n}": u for n in names}
        members = {m: u for m in cfg.get("members") or []}
        refined = [[{"start": 0, "end": 1, "probs": u[0].astype(np.float32)}]] if cfg.get("lantern") else None
        check_probs(self.fuse(seeds, members, refined), "EnsembleFusion")
