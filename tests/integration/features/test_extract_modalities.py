"""Each modality reaches the feature store aligned with its utterance: a probe on the real
features beats chance, and the same features shuffled across utterances score near chance."""

from __future__ import annotations

import warnings

import numpy as np
import pytest


def _probe(X: np.ndarray, y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred = cross_val_predict(clf, X, y, cv=StratifiedKFold(3, shuffle=True, random_state=0))
    return balanced_accuracy_score(y, pred)


@pytest.mark.slow
def test_shuffled_modality_scores_near_chance(tmp_path):
    from mer_ray.demo.corpus import make_corpus
    from mer_ray.features.local import run_local

    manifest = make_corpus(tmp_path, n_dialogues=14, seed=4, media=True)
    table = run_local(manifest, tmp_path / "media", {"n_frames": 2})
    rows = table.to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    # Keep the four most frequent labels so each class has enough examples for a 3-fold probe.
    labels = np.array([r["label"] for r in rows])
    top = [lab for lab, _ in sorted(((lab, (labels == lab).sum()) for lab in set(labels)), key=lambda x: -x[1])[:4]]
    keep = np.isin(labels, top)
    y = labels[keep]
    chance = 1 / len(top)
    rng = np.random.default_rng(0)
    for col in ("face_embedding", "audio_egemaps", "text_embedding"):
        X = np.array([r[col] for r in rows], dtype=np.float32)[keep]
        real = _probe(X, y)
        shuffled = np.mean([_probe(X[rng.permutation(len(X))], y) for _ in range(3)])
        assert real > chance + 0.15, (col, real, chance)
        assert abs(shuffled - chance) < 0.1, (col, shuffled, chance)
