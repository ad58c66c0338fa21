"""Serving an ``mer ensemble`` run directory answers what ``mer predict ensemble`` predicts.

A tiny ensemble (3 tiny vanilla seeds, a tiny FARCER and a tiny Lantern x FARCER, a saved fusion with its
mix opened, built by ``tests/unit/ensemble/tiny_ensemble.py``) predicts a manifest with
``mer predict ensemble``; the same dialogues then go through the serving members and the ensemble request
logic in process (no Ray). ``use_llm: false`` must be the vanilla seed average.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from mer_ray.serve import ensemble_run as R
from tests.unit.ensemble.tiny_ensemble import LABELS, build_tiny_ensemble, write_manifest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run dir, ``mer predict ensemble`` output table, its ``--no-llm`` output table)."""
    from mer_ray.ensemble.predict import CorpusPredictConfig, predict_corpus

    root = tmp_path_factory.mktemp("served")
    ens = build_tiny_ensemble(root)
    write_manifest(root / "corpus.csv")
    common = dict(models=str(ens), manifest=str(root / "corpus.csv"), work_dir=str(root / "work"))
    predict_corpus(CorpusPredictConfig(**common, out=str(root / "ens.parquet")))
    predict_corpus(CorpusPredictConfig(**common, out=str(root / "van.parquet"), llm=False))
    return ens, pq.read_table(root / "ens.parquet"), pq.read_table(root / "van.parquet")


@pytest.fixture(scope="module")
def served(run):
    """The serving members of the run, wired by the ensemble request logic in process."""
    from mer_ray.serve.ensemble import Ensemble
    from mer_ray.serve.featurize import RequestFeaturizer

    ens = str(run[0])
    members = {m: R.FinetunedMember(ens, m) for m in R.fusion_config(ens)["members"]}
    return Ensemble.local(RequestFeaturizer(), R.SeedAverageMember(ens), members=members,
                          ensemble_fusion=R.EnsembleFusionMember(ens))


def _dialogues(table):
    out: dict[str, list[dict]] = {}
    for r in table.select(["dialogue_id", "speaker", "text"]).to_pylist():
        out.setdefault(r["dialogue_id"], []).append({"speaker": r["speaker"], "text": r["text"]})
    return out


def _rows(table, dialogue_id, col):
    t = table.filter(np.asarray(table["dialogue_id"].to_pylist()) == dialogue_id)
    return np.asarray(t[col].to_pylist(), dtype=np.float64)


def _probs(out, key="probs"):
    return np.array([[u[key][lab] for lab in out["labels"]] for u in out["utterances"]])


def test_the_layout_is_detected_and_complete(run, tmp_path):
    ens = run[0]
    assert R.is_ensemble_run(ens) and not R.is_ensemble_run(tmp_path)
    assert R.check_run(ens, llm=True) == [] and R.uses_llm(R.fusion_config(ens))


def test_served_dialogues_equal_mer_predict_ensemble(run, served):
    _, table, vanilla = run
    for d, utterances in _dialogues(table).items():
        out = asyncio.run(served.recognize(utterances, use_llm=True))
        assert out["labels"] == LABELS
        # same members, same fusion function; one dialogue per call instead of a corpus batch: float noise only
        np.testing.assert_allclose(_probs(out), _rows(table, d, "emotion_probs"), atol=1e-5)
        np.testing.assert_allclose(_probs(out, "vanilla"), _rows(vanilla, d, "emotion_probs"), atol=1e-6)
        assert np.abs(_probs(out) - _probs(out, "vanilla")).max() > 1e-2  # the members moved the answer


def test_without_the_llm_the_answer_is_the_vanilla_seed_average(run, served):
    _, table, vanilla = run
    for d, utterances in _dialogues(table).items():
        out = asyncio.run(served.recognize(utterances, use_llm=False))
        np.testing.assert_allclose(_probs(out), _rows(vanilla, d, "emotion_probs"), atol=1e-6)
        np.testing.assert_allclose(_probs(out), _rows(table, d, "probs_vanilla_avg"), atol=1e-6)
        assert _probs(out).tolist() == _probs(out, "vanilla").tolist()


def test_a_missing_part_names_the_file_and_mer_ensemble(run, tmp_path, monkeypatch):
    import mer_ray.serve.deploy as deploy
    from mer_ray.cli import app

    def no_ray(*a, **k):
        raise AssertionError("mer serve started Ray although a model is missing")

    monkeypatch.setattr(deploy, "start_local_ray", no_ray)
    part = tmp_path / "run"
    part.mkdir()
    (part / "vanilla").symlink_to(run[0] / "vanilla", target_is_directory=True)  # seeds only: still being built
    res = CliRunner().invoke(app, ["serve", "--config", "serve/mer.yaml", "--models", str(part), "--exit"])
    assert res.exit_code == 1, res.output
    assert f"{part}/report/fusion/ensemble_fusion.json" in res.output
    assert "mer ensemble --config jobs/ensemble_meld.yaml" in res.output
    (part / "report").symlink_to(run[0] / "report", target_is_directory=True)  # fitted, but no member dirs
    res = CliRunner().invoke(app, ["serve", "--config", "serve/mer.yaml", "--models", str(part), "--exit"])
    assert res.exit_code == 1 and f"{part}/farcer/" in res.output and f"{part}/lantern_farcer/" in res.output


#: Prints what the Ingress of ``build_app`` is bound to (run in its own interpreter, see below).
_BOUND = """
import json, sys
from mer_ray.serve.builder import build_app

def names(llm):
    args = build_app({"models_dir": sys.argv[1], "llm": {"enabled": llm}})._bound_deployment.init_args
    name = lambda b: None if b is None else b._bound_deployment.name
    return {"refiner": name(args[3]), "fusion": name(args[7]),
            "members": None if args[6] is None else {m: name(b) for m, b in args[6].items()}}

print(json.dumps({"llm": names(True), "no_llm": names(False)}))
"""


def test_the_app_binds_one_deployment_per_finetuned_member(run):
    """Ingress(cfg, featurizer, vanilla, refiner, fusion, mllm, members, ensemble fusion), bound without Ray.

    Binding pickles the ingress class, which fails after an in-process Serve earlier in the same pytest process
    (docs/architecture.md, Tests): so it is bound in a fresh interpreter.
    """
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _BOUND, str(run[0])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["llm"] == {"refiner": None, "fusion": "EnsembleFusion",  # no Lantern in this fusion
                          "members": {"farcer": "FinetunedLLM_farcer", "lantern_farcer": "FinetunedLLM_lantern_farcer"}}
    assert got["no_llm"] == {"refiner": None, "fusion": None, "members": None}


def _as_meld(table, out_dir):
    """The corpus as a MELD ``test_sent_emo.csv`` (dialogue ``d<k>`` -> ``Dialogue_ID`` k) and its test predictions."""
    import csv

    import pyarrow as pa

    out_dir.mkdir()
    ids = {d: f"test/{d[1:]}" for d in table["dialogue_id"].to_pylist()}
    with open(out_dir / "test_sent_emo.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID", "Season",
                    "Episode", "StartTime", "EndTime"])
        for k, r in enumerate(table.select(["dialogue_id", "turn", "speaker", "text"]).to_pylist()):
            w.writerow([k + 1, r["text"], r["speaker"], "neutral", "neutral", r["dialogue_id"][1:], r["turn"], 1, 1,
                        "00:00:01,000", "00:00:02,000"])
    preds = pa.table({"dialogue_id": [ids[d] for d in table["dialogue_id"].to_pylist()], "turn": table["turn"],
                      "probs_ensemble": table["emotion_probs"], "probs_vanilla_avg": table["probs_vanilla_avg"]})
    pq.write_table(preds.replace_schema_metadata({"emotion_labels": table.schema.metadata[b"emotion_labels"]}),
                   out_dir / "test_predictions.parquet")
    return out_dir


@pytest.mark.ray
@pytest.mark.slow
def test_mer_bench_serve_check_over_http_finds_the_measured_predictions(run, tmp_path, tmp_path_factory):
    """`mer bench serve-check` starts `mer serve --config serve/ensemble.yaml` on a real local Ray and compares.

    It runs in its own interpreter: an in-process Serve (``_local_testing_mode``) earlier in the same pytest
    process would break pickling the ingress for a real ``serve.run`` (docs/architecture.md, Tests).
    """
    import json
    import os
    import subprocess
    import sys

    ens, table, _ = run
    meld = _as_meld(table, tmp_path / "meld")
    out = tmp_path / "serve_check.json"
    cmd = [sys.executable, "-m", "mer_ray", "bench", "serve-check", "--models", str(ens), "--predictions",
           str(meld / "test_predictions.parquet"), "--meld-dir", str(meld), "--n", "20", "--out", str(out),
           "--config", "serve/ensemble.yaml", "--port", "18437", "--num-cpus", "4"]
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}  # a short path: Ray's socket names
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["n_dialogues"] == len(got["dialogues"]) == 4  # every dialogue there is, at most --n
    assert got["max_abs_diff"]["ensemble"] <= 1e-5 and got["max_abs_diff"]["vanilla_avg"] <= 1e-6, got
    assert got["pass"] and got["goal"] == 1e-4


def test_lantern_candidates_reach_the_fusion_as_a_prompt_job_table_would(run, tmp_path):
    """A fusion fitted with Lantern (calibrated): the refiner's fields go in as the prompt job's outputs would."""
    import json

    import pyarrow as pa
    import torch

    from mer_ray.ensemble import combine as E
    from mer_ray.ensemble.artifacts import write_ensemble_fusion
    from mer_ray.ensemble.predict import EnsembleDir, apply_fusion
    from mer_ray.lantern.model import FEATURES, FusionConfig, build_fusion
    from mer_ray.lantern.queries import CF_DIALOGUE

    alt, members = tmp_path / "run", ["farcer", "lantern_farcer"]
    alt.mkdir()
    for part in ("vanilla", *members):
        (alt / part).symlink_to(run[0] / part, target_is_directory=True)
    (alt / "lantern").mkdir()
    (alt / "lantern" / "job.json").write_text(json.dumps({"sizes": [2, None], "stride": 1, "template": "lantern_v2"}))
    torch.manual_seed(3)
    model = build_fusion(FusionConfig(n_classes=len(LABELS), n_features=len(FEATURES) + 3))
    with torch.no_grad():
        model.mix.fill_(0.8)
    rng = np.random.default_rng(0)
    cf = rng.dirichlet(np.ones(len(LABELS)))
    sources = ["lantern", *members]
    write_ensemble_fusion(alt / "report" / "fusion", {
        "labels": LABELS, "mode": "fusion", "selected": "cal_short", "setting": {"hidden": 16}, "calibrated": True,
        "lantern": True, "members": members, "sources": sources, "features": E.feature_names(sources),
        "n_features": len(FEATURES) + 3, "n_classes": len(LABELS), "content_free": cf.tolist()}, model.state_dict())
    rows = [{"turn": i, "speaker": s, "text": t} for i, (s, t) in enumerate([("Ann", "oh my god"), ("Bob", "we hate coffee"),
                                                                           ("Ann", "okay so great")])]
    van = R.SeedAverageMember(str(alt)).predict(rows)
    llms = {m: R.FinetunedMember(str(alt), m).predict(rows, van["emotion_probs"]) for m in members}
    fields = [(0, 2), (1, 3), (0, 3)]  # [start, end) of sizes 2 and whole, stride 1
    detail = [[{"start": s, "end": e, "size": e - s, "error": None, "probs": rng.dirichlet(np.ones(7)).astype(np.float32)}
               for s, e in fields if s <= t < e] for t in range(3)]
    job_rows = [{"dialogue_id": R.REQUEST_ID, "target_pos": t, "field_start": c["start"], "field_end": c["end"],
                 "status": "ok", "llm_probs": c["probs"].tolist()} for t, cands in enumerate(detail) for c in cands]
    job_rows.append({"dialogue_id": CF_DIALOGUE, "target_pos": 0, "field_start": 0, "field_end": 0, "status": "ok",
                     "llm_probs": cf.tolist()})
    keys = [(R.REQUEST_ID, i) for i in range(3)]
    want, _ = apply_fusion(EnsembleDir.open(alt, need_fusion=True), keys, van["seeds"], llms, pa.Table.from_pylist(job_rows))
    fusion = R.EnsembleFusionMember(str(alt))
    np.testing.assert_allclose(fusion.fuse(van["seeds"], llms, detail), want, atol=1e-6)
    assert np.abs(fusion.fuse(van["seeds"], llms, None) - want).max() > 1e-3  # Lantern's candidates matter


def test_the_refiner_prompts_as_the_prompt_job_did(tmp_path):
    import json

    from mer_ray.serve.config import LLMConfig

    job = {"vanilla": "runs/x/vanilla/predictions/seed0", "sizes": [4, None], "stride": 4, "template": "lantern_v2",
           "few_shot": 0, "backend": {"kind": "llama_cpp", "model": "gemma3-270m", "gguf_file": None, "chat": True}}
    (tmp_path / "lantern").mkdir()
    (tmp_path / "lantern" / "job.json").write_text(json.dumps(job))
    s = R.refiner_settings(str(tmp_path), LLMConfig(n_threads=2).model_dump())
    assert s == {"backend": {"kind": "llama_cpp", "model": "gemma3-270m", "n_ctx": 4096, "n_threads": 2},
                 "sizes": [4, None], "stride": 4, "template": "lantern_v2", "chat": True}
    (tmp_path / "lantern" / "job.json").write_text(json.dumps({**job, "few_shot": 2}))
    with pytest.raises(ValueError, match="few_shot=2"):
        R.refiner_settings(str(tmp_path), LLMConfig().model_dump())
