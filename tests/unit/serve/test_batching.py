"""Dynamic batching of the text models, without Ray: the batched member functions called directly.

A batch holds dialogues of different lengths (1 to 12 turns, short and long texts); each dialogue's
answer must equal the member's unbatched answer within 1e-5. Also: one bad dialogue fails alone, the
co-located FeaturizerVanilla composes the same members, ``user_config`` is typed, and the health probes
fail on a broken or wedged model.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.integration.serve.test_local_mode import DIALOGUE, tiny_models

TOL = 1e-5
WORDS = "we were on a break and I can not believe you said that to me in front of everyone".split()


def dialogues(rng: np.random.Generator) -> list[list[dict]]:
    """Dialogues of 1, 3, 7 and 12 turns with texts of 1 to 17 words (so padding differs a lot in a batch)."""
    out = []
    for n in (1, 3, 7, 12):
        out.append([{"speaker": ["Ross", "Rachel", "Joey"][i % 3],
                     "text": " ".join(WORDS[: int(rng.integers(1, len(WORDS)))])} for i in range(n)])
    return out


def with_features(rows: list[list[dict]], rng: np.random.Generator) -> list[list[dict]]:
    """Add eGeMAPS and face features to some utterances (the tiny model reads them; None elsewhere)."""
    out = []
    for d in rows:
        nd = []
        for i, r in enumerate(d):
            r = dict(r)
            if i % 2 == 0:
                r["audio_egemaps"] = (rng.random(88) * 100).tolist()
            if i % 3 == 1:
                r["face_embedding"] = rng.normal(size=128).tolist()
            nd.append(r)
        out.append(nd)
    return out


@pytest.fixture(scope="module")
def featurizer():
    from mer_ray.serve.featurize import RequestFeaturizer

    return RequestFeaturizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory):
    """Three tiny vanilla seeds with a fine-tuned (tiny BERT) text encoder inside, as an ``mer ensemble`` run."""
    from tests.unit.ensemble.test_predict_corpus import _vanilla_seeds

    root = tmp_path_factory.mktemp("run")
    _vanilla_seeds(root)
    return root


def max_delta(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_one_minilm_pass_over_a_batch_equals_each_dialogue_alone(featurizer):
    ds = dialogues(np.random.default_rng(0))
    batched = featurizer.featurize_batch(ds)
    assert len(batched) == len(ds)
    worst = 0.0
    for d, rows in zip(ds, batched):
        alone = featurizer.featurize(d)
        assert [r["text"] for r in rows] == [u["text"] for u in d] and [r["turn"] for r in rows] == list(range(len(d)))
        worst = max(worst, max_delta([r["text_embedding"] for r in rows], [r["text_embedding"] for r in alone]))
    print(f"MiniLM: max |delta| batched vs alone = {worst:.3g}")
    assert worst <= TOL, worst


def test_one_vanilla_pass_over_a_batch_equals_each_dialogue_alone(featurizer, models):
    from mer_ray.serve.members import VanillaMember

    rng = np.random.default_rng(1)
    rows = with_features(featurizer.featurize_batch(dialogues(rng)), rng)
    rows[2] = list(reversed(rows[2]))  # rows out of turn order come back in the order given
    van = VanillaMember(str(models))
    batched = van.predict_batch(rows)
    worst = 0.0
    for d, out in zip(rows, batched):
        alone = van.predict(d)
        assert out["emotion_probs"].shape == (len(d), 7)
        for key in ("emotion_probs", "sentiment_probs", "vad"):
            worst = max(worst, max_delta(out[key], alone[key]))
    print(f"vanilla (frozen): max |delta| batched vs alone = {worst:.3g}")
    assert worst <= TOL, worst
    # the batch really mixes: the one-turn dialogue's answer differs from the twelve-turn one's first turn
    assert max_delta(batched[0]["emotion_probs"][0], batched[3]["emotion_probs"][0]) > 1e-4


def test_the_seed_average_with_a_fine_tuned_encoder_batches_exactly(featurizer, seed_run):
    from mer_ray.serve.ensemble_run import SeedAverageMember

    rows = featurizer.featurize_batch(dialogues(np.random.default_rng(2)))
    van = SeedAverageMember(str(seed_run))
    assert len(van.predictors) == 3 and van.predictors["seed0"].cfg.encoder == "tiny"
    batched = van.predict_batch(rows)
    worst = 0.0
    for d, out in zip(rows, batched):
        alone = van.predict(d)
        worst = max(worst, max_delta(out["emotion_probs"], alone["emotion_probs"]),
                    max_delta(out["lantern_reference"]["emotion_probs"], alone["lantern_reference"]["emotion_probs"]),
                    *(max_delta(out["seeds"][s], alone["seeds"][s]) for s in alone["seeds"]))
    print(f"seed average (fine-tuned encoder): max |delta| batched vs alone = {worst:.3g}")
    assert worst <= TOL, worst


def test_a_bad_dialogue_fails_alone_and_the_rest_of_its_batch_is_answered(featurizer, models):
    from mer_ray.serve.members import VanillaMember

    good = featurizer.featurize_batch([DIALOGUE])[0]
    dup = [dict(r, turn=0) for r in good]  # duplicate turns: predict_dialogue refuses them
    van = VanillaMember(str(models))
    out = van.predict_batch([good, dup, good[:1]])
    assert isinstance(out[1], ValueError) and "duplicate turns" in str(out[1])
    assert max_delta(out[0]["emotion_probs"], van.predict(good)["emotion_probs"]) <= TOL
    assert max_delta(out[2]["emotion_probs"], van.predict(good[:1])["emotion_probs"]) <= TOL


def test_media_that_cannot_be_decoded_fails_only_its_own_dialogue(featurizer):
    from mer_ray.serve.featurize import MediaError, b64

    bad = [{"speaker": "A", "text": "hi", "video_b64": b64(b"not a video at all")}]
    out = featurizer.featurize_batch([DIALOGUE, bad])
    assert isinstance(out[1], MediaError) and "utterances[0]" in str(out[1])
    assert len(out[0]) == 3 and out[0][0]["status"] == "ok"


def test_featurizer_vanilla_composes_the_two_members_in_one_call(models):
    from mer_ray.serve.deployments import FeaturizerVanilla
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.serve.members import VanillaMember

    fv = FeaturizerVanilla.func_or_class(str(models))  # the plain class under the Serve decorator
    ds = dialogues(np.random.default_rng(3))
    both = fv._featurize_predict_batch(ds)
    feat, van = RequestFeaturizer(), VanillaMember(str(models))
    for d, (rows, out) in zip(ds, both):
        ref = feat.featurize(d)
        assert max_delta([r["text_embedding"] for r in rows], [r["text_embedding"] for r in ref]) <= TOL
        assert max_delta(out["emotion_probs"], van.predict(ref)["emotion_probs"]) <= TOL
    assert fv.label_set_name() == "meld7"
    assert fv.batch_stats() == {"calls": 0, "items": 0, "max": 0}  # nothing went through Serve's queue
    # outside a replica (local testing mode) a call is a batch of one, through the same member code
    assert fv.in_replica is False
    rows, out = asyncio.run(fv.featurize_predict(ds[1]))
    assert max_delta(out["emotion_probs"], van.predict(feat.featurize(ds[1]))["emotion_probs"]) <= TOL
    assert fv.batch_stats() == {"calls": 1, "items": 1, "max": 1}
    fv.reconfigure({"max_batch_size": 4, "batch_wait_timeout_s": 0.01, "max_concurrent_batches": 2})
    assert fv.settings.max_concurrent_batches == 2 and set(fv.batched) == {"featurize_predict", "featurize", "predict"}
    assert {f._get_max_batch_size() for f in fv.batched.values()} == {4}
    assert {f._get_batch_wait_timeout_s() for f in fv.batched.values()} == {0.01}
    asyncio.run(fv.check_health())  # both probes pass on healthy models


def test_batch_stats_count_calls_items_and_the_largest_batch():
    from mer_ray.serve.deployments import BatchStats

    s = BatchStats()
    for n in (1, 4, 2):
        s.record(n)
    assert s.as_dict() == {"calls": 3, "items": 7, "max": 4}


def test_user_config_is_typed_and_only_batched_deployments_take_it():
    from pydantic import ValidationError

    from mer_ray.serve.builder import check_options
    from mer_ray.serve.config import ServeConfig
    from mer_ray.serve.deployments import BatchSettings

    with pytest.raises(ValidationError, match="max_batch_siz"):
        BatchSettings.model_validate({"max_batch_siz": 4})
    with pytest.raises(ValidationError):
        BatchSettings.model_validate({"max_batch_size": 0})
    split, coloc = ServeConfig(), ServeConfig(layout="colocated")
    check_options(split, {"Featurizer": {"user_config": {"max_batch_size": 4}}})
    with pytest.raises(ValueError, match="'Featurizer': bad user_config"):
        check_options(split, {"Featurizer": {"user_config": {"wait": 1}}})
    with pytest.raises(ValueError, match="'Fusion': user_config is only read by the batched"):
        check_options(split, {"Fusion": {"user_config": {"max_batch_size": 4}}})
    with pytest.raises(ValueError, match=r"layout 'colocated' does not deploy"):
        check_options(coloc, {"Featurizer": {"num_replicas": 1}})
    with pytest.raises(ValueError, match=r"layout 'split' does not deploy"):
        check_options(split, {"FeaturizerVanilla": {"num_replicas": 1}})


def test_health_probes_fail_on_a_broken_model_and_on_a_wedged_engine(featurizer, models, monkeypatch):
    from mer_ray.serve.members import EngineLock, VanillaMember

    featurizer.probe()
    monkeypatch.setattr(featurizer.text, "encode", lambda texts: np.full((len(texts), 384), np.nan, np.float32))
    with pytest.raises(RuntimeError, match="Featurizer: the health probe's text embedding"):
        featurizer.probe()
    van = VanillaMember(str(models))
    van.probe()
    broken = {"emotion_probs": np.full((1, 7), np.nan), "sentiment_probs": None, "vad": None}
    monkeypatch.setattr(van.predictor, "predict_dialogue", lambda rows: broken)
    with pytest.raises(RuntimeError, match="Vanilla: the health probe gave"):
        van.probe()

    lock, ran = EngineLock(), []
    lock.probe(lambda: ran.append(1), "LLM")
    lock.probe(lambda: ran.append(2), "LLM")  # the engine just answered: no second probe
    assert ran == [1]
    with pytest.raises(RuntimeError, match="LLM: the health probe failed"):
        lock.probe(lambda: 1 / 0, "LLM", fresh_s=0)
    with lock:  # busy with a young request: the probe does not wait for it, and passes
        lock.probe(lambda: ran.append(3), "LLM", fresh_s=0)
        assert ran == [1]
        lock.since -= 10_000  # the same call, as if it had held the engine for hours
        with pytest.raises(RuntimeError, match="held the engine for .* wedged"):
            lock.probe(lambda: None, "LLM")
    lock.probe(lambda: ran.append(4), "LLM", fresh_s=0)  # a failed probe and a finished call released the engine
    assert ran == [1, 4]


def test_the_co_located_ensemble_answers_what_the_split_one_answers(models):
    from mer_ray.serve.ensemble import Ensemble
    from mer_ray.serve.featurize import RequestFeaturizer
    from mer_ray.serve.members import VanillaMember

    feat, van = RequestFeaturizer(), VanillaMember(str(models))
    split = Ensemble.local(feat, van)

    async def both(utterances):
        rows = feat.featurize(utterances)
        return rows, van.predict(rows)

    coloc = Ensemble.local(feat, van)
    coloc.featurize_vanilla = both
    a = asyncio.run(split.recognize(DIALOGUE, use_llm=False))
    b = asyncio.run(coloc.recognize(DIALOGUE, use_llm=False))
    assert [u["probs"] for u in a["utterances"]] == [u["probs"] for u in b["utterances"]]
    assert b["timing_ms"]["vanilla"] == 0.0 and b["timing_ms"]["features"] > 0
