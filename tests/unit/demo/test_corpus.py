"""The generated demo corpus: deterministic, in the schema, label-dependent but not trivial."""

from __future__ import annotations

import numpy as np

from mer_ray.data.loaders import load_manifest
from mer_ray.demo.corpus import make_corpus, make_rows


def test_corpus_is_deterministic_and_loads(tmp_path):
    p1 = make_corpus(tmp_path / "a", n_dialogues=12, seed=3)
    p2 = make_corpus(tmp_path / "b", n_dialogues=12, seed=3)
    assert p1.read_text() == p2.read_text()
    t = load_manifest(p1, label_set="meld7", sentiment_set="meld_sentiment3")
    assert t.num_rows == len(make_rows(12, 3))
    assert set(t.column("split").to_pylist()) == {"train", "dev", "test"}
    assert t.column("video").null_count == t.num_rows  # text-only corpus
    v = np.array(t.column("valence").to_pylist())
    assert ((v >= 1) & (v <= 5)).all()


def test_text_carries_signal_but_is_noisy():
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train = make_rows(150, seed=0)
    test = make_rows(60, seed=1)
    vec = CountVectorizer().fit([r["text"] for r in train])
    clf = LogisticRegression(max_iter=2000).fit(vec.transform([r["text"] for r in train]), [r["label"] for r in train])
    acc = (clf.predict(vec.transform([r["text"] for r in test])) == np.array([r["label"] for r in test])).mean()
    majority = max(np.mean([r["label"] == lab for r in test]) for lab in {r["label"] for r in test})
    assert acc > majority + 0.15, (acc, majority)  # wording carries the label ...
    assert acc < 0.95, acc  # ... but not perfectly
