"""Adapters of the packaged Gemma 3 270M behind one ``Adapters`` deployment, on the session's real local Ray.

Two adapters are fine-tuned with the shipped CPU config through the command users run
(``mer finetune --config jobs/finetune_cpu.yaml ... --adapter-name NAME --models DIR``, a subprocess attached
to the session's Ray with ``--address``), each for 2 optimizer steps on 3 MELD train dialogues: ``tv`` on MELD's
emotions (meld7) and ``sentiment`` on MELD's sentiment annotation (meld_sentiment3, the same dialogues written
as a manifest whose ``label`` is the sentiment). Both share one base model in one replica, so a request
switches the real peft model between two LoRAs. Each answer carries its adapter's label set and labels, and
its probabilities equal those of the adapter loaded alone in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[3]
ROWS = [{"speaker": "Ross", "text": "Oh my God, I can't believe it!"},
        {"speaker": "Rachel", "text": "What are you talking about? Get out of here."}]
MELD7 = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
SENTIMENT3 = ["neutral", "positive", "negative"]
#: What keeps a fine-tune to seconds: tests/integration/mllm/test_finetune.py's overrides of the CPU config (2 steps
#: of 4 utterances, 1 CPU, no evaluation), less its step-1 DeepSpeed checkpoint (the final export is all we need).
SHORT = ["train.max_steps=2", "train.warmup_steps=1", "train.checkpoint_every=1000", "ray.cpus_per_worker=1", "eval.splits=[]"]


class _Finetune:
    """``mer finetune`` on the shipped CPU config, started in the background, installing adapter ``name`` into
    ``models``."""

    def __init__(self, address: str, models: Path, name: str, work: Path, sets: list[str]):
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        sets = [*SHORT, *sets, f"out={work / name}", f"ray.storage_path={work / 'ray_results'}"]
        cmd = [str(bin_dir / "mer"), "finetune", "--config", str(REPO / "jobs" / "finetune_cpu.yaml"), "--address", address,
               "--no-eval", "--adapter-name", name, "--models", str(models), *[a for s in sets for a in ("--set", s)]]
        self.name, self.log, self.t0 = name, work / f"finetune_{name}.log", time.perf_counter()
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

    def wait(self) -> float:
        """Its seconds, once it has installed the adapter."""
        rc = self.proc.wait(timeout=900)
        out = self.log.read_text()
        assert rc == 0 and f"adapter {self.name!r} installed" in out, out[-5000:]
        return time.perf_counter() - self.t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _sentiment_manifest(meld_dir: Path, out: Path) -> Path:
    """3 MELD train dialogues whose ``label`` is their sentiment (meld_sentiment3), as a Parquet manifest."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mer_ray.data.loaders import load_meld

    train = load_meld(meld_dir, "train")
    ids = sorted(set(train.column("dialogue_id").to_pylist()))[:3]
    sub = train.filter(pc.is_in(train.column("dialogue_id"), pa.array(ids)))
    sub = sub.set_column(sub.schema.get_field_index("label"), "label", sub.column("sentiment"))
    pq.write_table(sub, out)
    return out


def test_packaged_adapters_on_one_deployment_answer_in_their_labels_as_in_process(ray_local, meld_dir, tmp_path):
    import torch
    from ray import serve

    from mer_ray.mllm.adapters import AdapterHost, list_adapters
    from mer_ray.serve.multiplexed import adapters_deployment

    t_start = time.perf_counter()
    models = tmp_path / "models"
    models.mkdir()
    address = ray_local.get_runtime_context().gcs_address
    manifest = _sentiment_manifest(meld_dir, tmp_path / "sentiment.parquet")
    # Both at once: each trains on 1 torch thread (ray.cpus_per_worker=1), so together they use the 2 cores,
    # and their start-ups (imports, workers, model load) overlap: 48 s here instead of 83 s one after the other.
    runs = [_Finetune(address, models, "tv", tmp_path, [f"data.meld_dir={meld_dir}", "data.max_dialogues={train: 3}"]),
            _Finetune(address, models, "sentiment", tmp_path, [f"data.meld_dir={meld_dir}", f"data.manifests={{train: {manifest}}}",
                                                               "model.label_set=meld_sentiment3"])]
    try:
        took = {f"finetune_{r.name}": r.wait() for r in runs}
    finally:
        for r in runs:
            r.stop()
    assert list_adapters(models) == {"sentiment": "meld_sentiment3", "tv": "meld7"}

    # In process, each adapter alone (its own host), with the replica's torch threads (Adapters' default: 1).
    t0, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = {n: AdapterHost(models).load(n).predict(ROWS, calibrated=False) for n in ("tv", "sentiment")}
    finally:
        torch.set_num_threads(threads)
    took["in_process"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    h = serve.run(adapters_deployment(max_num_models_per_replica=2).options(ray_actor_options={"num_cpus": 0.5}).bind(str(models)),
                  name="adapters_packaged", route_prefix=None)
    try:
        def ask(name):
            return h.options(multiplexed_model_id=name).predict.remote(ROWS).result(timeout_s=300)

        tv, sentiment = ask("tv"), ask("sentiment")  # the first loads the base model and its LoRA in the replica
        t1 = time.perf_counter()
        again = ask("tv")  # the LoRA switched back on the same shared model
        took["request_loaded"] = time.perf_counter() - t1
        assert h.loaded.remote().result() == ["sentiment", "tv"]
    finally:
        serve.shutdown()  # the session's Ray stays up for later modules
    took["serve"] = time.perf_counter() - t0

    assert (tv["adapter"], tv["label_set"], tv["labels"]) == ("tv", "meld7", MELD7)
    assert (sentiment["adapter"], sentiment["label_set"], sentiment["labels"]) == ("sentiment", "meld_sentiment3", SENTIMENT3)
    for name, out in (("tv", tv), ("sentiment", sentiment)):
        p = np.asarray(out["probs"])
        assert p.shape == (len(ROWS), len(out["labels"])) and np.isfinite(p).all() and (p >= 0).all()
        # float32 softmax over <= 7 labels, summed in float64: |sum - 1| <= ~10 * 2**-24 < 1e-6
        np.testing.assert_allclose(p.sum(1), 1.0, rtol=0, atol=1e-6)
        # Exact: the same weights, the same code, the same torch build and 1 thread on both sides (a Ray worker
        # and this process are the same interpreter); more threads could reorder float32 sums.
        np.testing.assert_array_equal(p, alone[name])
        assert out["temperature"] == 1.0 and out["calibrated"] is False  # no calibration.json yet
    np.testing.assert_array_equal(again["probs"], tv["probs"])

    took["total"] = time.perf_counter() - t_start
    print("packaged adapters, seconds:", {k: round(v, 1) for k, v in took.items()})
