"""A quick stand-in vanilla model: TF-IDF + logistic regression on MELD train text.

Used by ``mer bench lantern`` when no vanilla predictions are given (the
benchmark needs *fixed* references, not good ones), and for development before
the real vanilla model's predictions exist. It writes the vanilla prediction
contract: one row per utterance, ``emotion_probs``/``sentiment_probs`` with
their label orders in the schema metadata, never a gold column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.data.labels import get_label_set
from mer_ray.data.leak import strip_gold


def _fit(texts: list[str], y: list[str], labels: Sequence[str], seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
                        LogisticRegression(C=4.0, max_iter=2000, random_state=seed))
    clf.fit(texts, y)
    order = [list(clf.classes_).index(lab) for lab in labels]
    return lambda t: clf.predict_proba(t)[:, order]


def quick_vanilla_predictions(data_dir: str | Path, splits: Sequence[str] = ("dev", "test"),
                              out: str | Path | None = None, seed: int = 0) -> pa.Table:
    """Train on MELD train, predict ``splits``; returns (and optionally writes) the prediction table."""
    from mer_ray.data.loaders import load_meld

    train = load_meld(data_dir, "train")
    emo, sent = get_label_set("meld7").labels, get_label_set("meld_sentiment3").labels
    texts = [t or "" for t in train["text"].to_pylist()]
    f_emo = _fit(texts, train["label"].to_pylist(), emo, seed)
    f_sent = _fit(texts, train["sentiment"].to_pylist(), sent, seed)
    parts = []
    for split in splits:
        t = strip_gold(load_meld(data_dir, split))  # gold never reaches the model's inputs
        x = [s or "" for s in t["text"].to_pylist()]
        pe, ps = f_emo(x).astype(np.float32), f_sent(x).astype(np.float32)
        parts.append(pa.table({
            "dialogue_id": t["dialogue_id"], "turn": t["turn"], "speaker": t["speaker"], "text": t["text"],
            "split": pa.array([split] * t.num_rows),
            "emotion_probs": pa.array(list(pe), pa.list_(pa.float32())),
            "emotion_pred": pa.array([emo[i] for i in pe.argmax(1)]),
            "sentiment_probs": pa.array(list(ps), pa.list_(pa.float32())),
            "vad": pa.nulls(t.num_rows, pa.list_(pa.float32())),
        }))
    table = pa.concat_tables(parts).replace_schema_metadata({
        "emotion_labels": json.dumps(list(emo)), "sentiment_labels": json.dumps(list(sent)),
        "model": "quick-vanilla: tfidf+logreg on MELD train (a stand-in, not the vanilla model)"})
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    return table
