"""`mer predict ensemble` on another corpus, without retraining: a tiny ensemble (3 tiny vanilla seeds, a tiny
FARCER and a tiny Lantern x FARCER, a saved fusion with its mix opened) predicts a 5-class manifest with
unlabelled rows; the label map, `--no-llm`, gold-independence and `mer eval`'s unlabelled count are checked."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from mer_ray.data.labelmap import LabelMapError, read_label_map
from mer_ray.data.leak import assert_no_gold
from mer_ray.ensemble import combine as E
from mer_ray.ensemble.artifacts import write_ensemble_fusion
from mer_ray.ensemble.predict import CorpusPredictConfig, predict_corpus
from mer_ray.lantern.model import FEATURES, FusionConfig, build_fusion

LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
#: A 5-class target set in which MELD's disgust and fear do not occur: their mass is dropped, the rest renormalised.
MAP = {"neutral": ["neutral"], "happy": ["joy"], "angry": ["anger"], "sad": ["sadness"], "surprised": ["surprise"]}
TARGETS = list(MAP)
WORDS = ["okay", "so", "we", "are", "going", "what", "coffee", "house", "great", "hate", "oh", "my", "god"]


def _vanilla_seeds(root):
    from mer_ray.vanilla.model import VanillaConfig, build_vanilla

    cfg = VanillaConfig(encoder="tiny", modalities=[], hidden=16)
    for s in range(3):
        torch.manual_seed(s)
        d = root / "vanilla" / "models" / "vanilla" / f"seed{s}"
        d.mkdir(parents=True)
        torch.save(build_vanilla(cfg).state_dict(), d / "model.pt")
        (d / "vanilla.json").write_text(json.dumps({"model": cfg.model_dump(), "emotion_labels": LABELS,
                                                    "sentiment_labels": None, "has_vad": False, "seed": s}))


def _llm_members(root, base):
    from mer_ray.mllm.artifacts import save_artifacts
    from mer_ray.mllm.build import ModelConfig, build_mllm
    from mer_ray.mllm.examples import PromptConfig

    for i, (name, refs) in enumerate((("farcer", False), ("lantern_farcer", True))):
        torch.manual_seed(10 + i)
        cfg = ModelConfig(base=str(base))
        model, _ = build_mllm(cfg)
        with torch.no_grad():  # LoRA B starts at zero; make each member its own model
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        prompt = PromptConfig(template="farcer-dialogue-v1", references=refs, max_tokens=1024, context_turns=2)
        meta = {"labels": LABELS, "label_set": "meld7", "model": cfg.model_dump(), "prompt": prompt.model_dump(),
                "shots": [], "template_version": "farcer-dialogue-v1", "base_model": cfg.base}
        save_artifacts(root / name, model.state_dict(), model, meta)


def _fusion(root):
    """A saved fusion over both members with the mix opened, so the members move the output."""
    members = ["farcer", "lantern_farcer"]
    torch.manual_seed(0)
    model = build_fusion(FusionConfig(n_classes=len(LABELS), n_features=len(FEATURES) + 2))
    with torch.no_grad():
        model.mix.fill_(0.8)
        model.llm_bias.normal_(0, 0.3)
    cfg = {"labels": LABELS, "mode": "fusion", "selected": "raw_short", "setting": {"steps": 60, "hidden": 16},
           "calibrated": False, "lantern": False, "members": members, "sources": members,
           "features": E.feature_names(members), "n_features": len(FEATURES) + 2, "n_classes": len(LABELS)}
    write_ensemble_fusion(root / "report" / "fusion", cfg, model.state_dict())
    return model


def _manifest(path, shuffle_gold=False):
    rng = random.Random(0)
    rows = []
    for d in range(4):
        for t in range(rng.randint(3, 5)):
            rows.append({"dialogue_id": f"d{d}", "turn": t, "speaker": rng.choice(["Ann", "Bob"]),
                         "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))),
                         "label": "" if rng.random() < 0.3 else rng.choice(TARGETS)})
    if shuffle_gold:
        labels = [r["label"] for r in rows]
        random.Random(1).shuffle(labels)
        rows = [dict(r, label=lab) for r, lab in zip(rows, labels)]
    pacsv.write_csv(pa.Table.from_pylist(rows), path)
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mer_ray.mllm.tiny import build_tiny_lm

    root = tmp_path_factory.mktemp("corpus")
    ens = root / "ensemble"
    _vanilla_seeds(ens)
    _llm_members(ens, build_tiny_lm(root / "tiny_lm", "gemma3", single_token_words=tuple(LABELS)))
    fusion = _fusion(ens)
    rows = _manifest(root / "corpus.csv")
    (root / "map.yaml").write_text("".join(f"{k}: [{', '.join(v)}]\n" for k, v in MAP.items()))
    common = dict(models=str(ens), manifest=str(root / "corpus.csv"), work_dir=str(root / "work"))
    raw = predict_corpus(CorpusPredictConfig(**common, out=str(root / "raw.parquet")))
    mapped = predict_corpus(CorpusPredictConfig(**common, out=str(root / "mapped.parquet"), label_map=str(root / "map.yaml")))
    _manifest(root / "shuffled.csv", shuffle_gold=True)
    shuffled = predict_corpus(CorpusPredictConfig(models=str(ens), manifest=str(root / "shuffled.csv"),
                                                  work_dir=str(root / "work_shuffled"),  # no cache: predicted anew
                                                  out=str(root / "shuffled.parquet"), label_map=str(root / "map.yaml")))
    return root, ens, rows, fusion, {"raw": raw, "mapped": mapped, "shuffled": shuffled}


def _probs(t, col="emotion_probs"):
    return np.asarray(t[col].to_pylist(), dtype=np.float64)


def test_every_row_once_in_the_contract_with_the_fusion_applied(built):
    root, _, rows, fusion, summary = built
    t = pq.read_table(root / "raw.parquet")
    keys = list(zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist()))
    assert len(keys) == len(rows) == len(set(keys)) and set(keys) == {(r["dialogue_id"], r["turn"]) for r in rows}
    assert t.column_names[:7] == ["dialogue_id", "turn", "speaker", "text", "split", "emotion_probs", "emotion_pred"]
    assert_no_gold(t, "the test")
    assert json.loads(t.schema.metadata[b"emotion_labels"]) == LABELS
    assert summary["raw"]["members"] == ["farcer", "lantern_farcer"]
    assert summary["raw"]["unlabelled_rows"] == sum(r["label"] == "" for r in rows) > 0
    # the fusion as saved, recomputed from the member columns, is the output; and the members moved it
    inp = E.SplitInputs(keys, {f"vanilla_seed{s}": _probs(t, f"probs_vanilla_seed{s}") for s in range(3)},
                        {m: _probs(t, f"probs_{m}") for m in ("farcer", "lantern_farcer")})
    want = E.F.predict(fusion.eval(), E.fusion_data(inp, False, ["farcer", "lantern_farcer"], False))
    np.testing.assert_allclose(_probs(t), want, atol=1e-5)
    assert np.abs(_probs(t) - _probs(t, "probs_vanilla_avg")).max() > 1e-2
    # Lantern x FARCER read the vanilla seed average as its references (and they matter)
    from mer_ray.mllm.examples import Dialogue
    from mer_ray.mllm.predict import MLLMPredictor

    pred = MLLMPredictor.from_dir(root / "ensemble" / "lantern_farcer")
    dialogues = {}
    for r in t.select(["dialogue_id", "turn", "speaker", "text"]).to_pylist():
        dialogues.setdefault(r["dialogue_id"], Dialogue(r["dialogue_id"], [], [])).rows.append(r)
    for d in dialogues.values():
        d.feats = [{} for _ in d.rows]
    avg = _probs(t, "probs_vanilla_avg")
    with_refs = pred.predict(list(dialogues.values()), progress=False, references=dict(zip(keys, avg)))
    without = pred.predict(list(dialogues.values()), progress=False, references={k: np.eye(7)[0] for k in keys})
    np.testing.assert_allclose(_probs(t, "probs_lantern_farcer"), np.stack([with_refs[k] for k in keys]), atol=1e-6)
    assert np.abs(np.stack([without[k] for k in keys]) - np.stack([with_refs[k] for k in keys])).max() > 1e-4


def test_a_fusion_fitted_with_lantern_runs_without_it_its_candidates_masked(built):
    """No `lantern/` job (or --no-lantern): Lantern's candidate slots stay, masked; the members still fuse."""
    root, ens, _, fusion, _ = built
    alt = root / "ensemble_lantern"
    for part in ("vanilla", "farcer", "lantern_farcer"):
        (alt / part).parent.mkdir(parents=True, exist_ok=True)
        (alt / part).symlink_to(ens / part)
    members = ["farcer", "lantern_farcer"]
    sources = ["lantern", *members]
    torch.manual_seed(1)
    model = build_fusion(FusionConfig(n_classes=len(LABELS), n_features=len(FEATURES) + 3))
    with torch.no_grad():
        model.mix.fill_(0.8)
    cfg = {"labels": LABELS, "mode": "fusion", "selected": "raw_short", "setting": {"hidden": 16}, "calibrated": True,
           "lantern": True, "members": members, "sources": sources, "features": E.feature_names(sources),
           "n_features": len(FEATURES) + 3, "n_classes": len(LABELS)}
    write_ensemble_fusion(alt / "report" / "fusion", cfg, model.state_dict())
    s = predict_corpus(CorpusPredictConfig(models=str(alt), manifest=str(root / "corpus.csv"), work_dir=str(root / "work"),
                                           out=str(root / "no_lantern.parquet")))
    assert s["lantern"].startswith("skipped") and s["members"] == members
    t = pq.read_table(root / "no_lantern.parquet")
    keys = list(zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist()))
    inp = E.SplitInputs(keys, {f"vanilla_seed{i}": _probs(t, f"probs_vanilla_seed{i}") for i in range(3)},
                        {m: _probs(t, f"probs_{m}") for m in members})
    data = E.fusion_data(inp, True, members, True)
    assert not data.mask[:, 0].any() and data.mask[:, 1:].all()
    np.testing.assert_allclose(_probs(t), E.F.predict(model.eval(), data), atol=1e-5)
    assert np.abs(_probs(t) - _probs(t, "probs_vanilla_avg")).max() > 1e-2


def test_the_label_map_sums_and_renormalises(built):
    root, _, rows, _, summary = built
    raw, mapped = pq.read_table(root / "raw.parquet"), pq.read_table(root / "mapped.parquet")
    assert json.loads(mapped.schema.metadata[b"emotion_labels"]) == TARGETS == summary["mapped"]["labels"]
    for col in ("emotion_probs", "probs_vanilla_avg", "probs_farcer"):
        p = _probs(raw, col)
        want = np.stack([p[:, [LABELS.index(lab) for lab in MAP[t]]].sum(1) for t in TARGETS], 1)
        want /= want.sum(1, keepdims=True)  # disgust and fear have no target: their mass drops out
        np.testing.assert_allclose(_probs(mapped, col), want, atol=1e-6)
        np.testing.assert_allclose(_probs(mapped, col).sum(1), 1.0, atol=1e-5)
    assert mapped["emotion_pred"].to_pylist() == [TARGETS[i] for i in _probs(mapped).argmax(1)]


def test_gold_labels_never_change_the_predictions(built):
    root, *_ = built
    a, b = pq.read_table(root / "mapped.parquet"), pq.read_table(root / "shuffled.parquet")
    assert b.equals(a) and b.schema.metadata == a.schema.metadata


def test_no_llm_is_the_vanilla_seed_average(built):
    from mer_ray.data.loaders import load_manifest
    from mer_ray.ensemble.cli import predict_app
    from mer_ray.vanilla.predict import VanillaPredictor

    root, ens, *_ = built
    res = CliRunner().invoke(predict_app, ["--models", str(ens), "--manifest", str(root / "corpus.csv"),
                                           "--out", str(root / "vanilla.parquet"), "--no-llm"])
    assert res.exit_code == 0, res.output
    assert "without a gold label" in res.output
    t = pq.read_table(root / "vanilla.parquet")
    table = load_manifest(root / "corpus.csv")
    avg = np.mean([VanillaPredictor.from_dir(ens / "vanilla" / "models" / "vanilla" / f"seed{s}")
                   .predict_table(table)["emotion_probs"] for s in range(3)], axis=0)
    np.testing.assert_allclose(_probs(t), avg, atol=1e-6)
    assert json.loads(t.schema.metadata[b"members"]) == [] and "probs_farcer" not in t.column_names


def test_mer_eval_scores_the_mapped_labels_and_skips_unlabelled_rows(built):
    from mer_ray.vanilla.cli import app

    root, _, rows, *_ = built
    n_un = sum(r["label"] == "" for r in rows)
    outs = {}
    for name in ("mapped", "raw"):  # raw: mapped by eval itself; same argmax, same scores
        res = CliRunner().invoke(app, ["eval", str(root / f"{name}.parquet"), "--data", str(root / "corpus.csv"),
                                       "--dataset", "manifest", "--out", str(root / f"eval_{name}"),
                                       "--label-map", str(root / "map.yaml")])
        assert res.exit_code == 0, res.output
        assert f"{n_un} unlabelled rows skipped" in res.output
        outs[name] = json.loads((root / f"eval_{name}" / "report.json").read_text())
    for r in outs.values():
        assert r["unlabelled_skipped"] == n_un and r["test"]["n"] == len(rows) - n_un
        assert r["test"]["labels"] == TARGETS
    assert outs["raw"]["test"]["weighted_f1"] == outs["mapped"]["test"]["weighted_f1"]


@pytest.mark.parametrize("text, match", [
    ("neutral: [neutral]\nhappy: [joy, glee]\n", r"map\.yaml: key 'happy' lists 'glee'"),
    ("neutral: [neutral]\nsad: []\n", r"map\.yaml: key 'sad' lists no model label"),
    ("neutral: [neutral]\nangry: [anger]\nmad: [anger]\n", r"map\.yaml: model label 'anger' .* 'angry' and 'mad'"),
])
def test_bad_label_maps_name_the_file_and_the_key(tmp_path, text, match):
    (tmp_path / "map.yaml").write_text(text)
    with pytest.raises(LabelMapError, match=match):
        read_label_map(tmp_path / "map.yaml").projection(LABELS)


@pytest.mark.ray
@pytest.mark.slow
def test_lantern_runs_as_a_prompt_job_with_the_ensembles_settings(built, ray_local):
    """A fusion fitted with Lantern: the prompt job runs on the corpus (SmolLM2, job.json's settings) and fuses."""
    from mer_ray.ensemble.experiment import load_lantern

    root, ens, _, _, _ = built
    alt = root / "ensemble_with_lantern"
    for part in ("vanilla", "farcer", "lantern_farcer"):
        (alt / part).parent.mkdir(parents=True, exist_ok=True)
        (alt / part).symlink_to(ens / part)
    job = {"vanilla": "runs/x/vanilla/predictions/seed1", "sizes": [2, None], "stride": 2, "template": "lantern_v2",
           "few_shot": 0, "seed": 0, "backend": {"kind": "llama_cpp", "model": "smollm2-135m-instruct", "chat": True}}
    (alt / "lantern").mkdir()
    (alt / "lantern" / "job.json").write_text(json.dumps(job))
    members, sources = ["farcer"], ["lantern", "farcer"]
    torch.manual_seed(2)
    model = build_fusion(FusionConfig(n_classes=len(LABELS), n_features=len(FEATURES) + 2))
    with torch.no_grad():
        model.mix.fill_(0.8)
    cfg = {"labels": LABELS, "mode": "fusion", "selected": "cal_short", "setting": {"hidden": 16}, "calibrated": True,
           "lantern": True, "members": members, "sources": sources, "features": E.feature_names(sources),
           "n_features": len(FEATURES) + 2, "n_classes": len(LABELS),
           "lantern_job": {"sizes": [2, None], "stride": 2, "template": "lantern_v2"}}
    write_ensemble_fusion(alt / "report" / "fusion", cfg, model.state_dict())
    work = root / "work_lantern"
    s = predict_corpus(CorpusPredictConfig(models=str(alt), manifest=str(root / "corpus.csv"), work_dir=str(work),
                                           out=str(root / "lantern.parquet"), label_map=str(root / "map.yaml")))
    assert s["lantern"] == "used" and s["members"] == ["farcer", "lantern"]
    t = pq.read_table(root / "lantern.parquet")
    raw = pq.read_table(root / "raw.parquet")  # unmapped inputs, same rows and order
    keys = list(zip(raw["dialogue_id"].to_pylist(), raw["turn"].to_pylist()))
    llm = load_lantern(work / "lantern", LABELS)[0]
    inp = E.SplitInputs(keys, {f"vanilla_seed{i}": _probs(raw, f"probs_vanilla_seed{i}") for i in range(3)},
                        {"farcer": _probs(raw, "probs_farcer")}, llm)
    data = E.fusion_data(inp, True, members, True)
    assert data.mask[:, :-1].any(1).all()  # every utterance has a Lantern candidate
    lmap = read_label_map(root / "map.yaml")
    np.testing.assert_allclose(_probs(t), lmap.apply(E.F.predict(model.eval(), data), LABELS), atol=1e-5)
    np.testing.assert_allclose(_probs(t, "probs_lantern"), lmap.apply(E.lantern_alone(inp), LABELS), atol=1e-5)
    # the prompts carried the seed job.json names (seed1), not seed0 or the average
    ref = pq.read_table(work / "lantern_reference.parquet")
    np.testing.assert_allclose(_probs(ref), _probs(raw, "probs_vanilla_seed1"), atol=1e-6)
