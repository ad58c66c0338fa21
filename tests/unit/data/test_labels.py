"""Label sets as data and the written-down mappings between them."""

from __future__ import annotations

import csv

import pytest

from mer_ray.data.labels import LABEL_SETS, MAPPINGS, get_label_set, map_label

EXPECTED = {"meld7": 7, "meld_sentiment3": 3, "iemocap6": 6, "iemocap4": 4, "emorynlp7": 7}


def test_label_sets():
    assert {n: len(s) for n, s in LABEL_SETS.items()} == EXPECTED
    for name, s in LABEL_SETS.items():
        assert s.name == name and len(set(s.labels)) == len(s.labels)
        assert all(lab and lab == lab.strip().lower() for lab in s.labels)
        assert [s.index(lab) for lab in s.labels] == list(range(len(s)))
    with pytest.raises(ValueError, match="unknown label 'happy' for label set 'meld7'"):
        get_label_set("meld7").index("happy")
    with pytest.raises(ValueError, match="unknown label set 'meld9'"):
        get_label_set("meld9")


@pytest.mark.parametrize(("source", "target"), list(MAPPINGS))
def test_every_mapping_is_total_and_lands_in_its_target(source, target):
    mapping, src, tgt = MAPPINGS[(source, target)], get_label_set(source), get_label_set(target)
    assert set(mapping) == set(src.labels)  # total over its source: every label decided, none invented
    assert all(v is None or v in tgt.labels for v in mapping.values())
    for lab in src.labels:
        assert map_label(lab, source, target) == mapping[lab]


def test_documented_mappings():
    assert map_label("excited", "iemocap6", "iemocap4") == "happy"
    assert map_label("frustrated", "iemocap6", "iemocap4") is None
    assert map_label("surprise", "meld7", "meld_sentiment3") is None  # either polarity in MELD
    assert map_label("joy", "meld7", "meld7") == "joy"
    with pytest.raises(ValueError, match="unknown label 'glee'"):
        map_label("glee", "meld7", "iemocap4")
    with pytest.raises(ValueError, match="no written-down mapping"):
        map_label("neutral", "meld_sentiment3", "iemocap6")
    with pytest.raises(ValueError, match="unknown label"):
        map_label("glee", "meld7", "meld7")


def test_meld_label_sets_match_the_data(meld_dir):
    with open(meld_dir / "train_sent_emo.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["Emotion"] for r in rows} == set(get_label_set("meld7").labels)
    assert {r["Sentiment"] for r in rows} == set(get_label_set("meld_sentiment3").labels)
    # The meld7 -> sentiment mapping agrees with every MELD annotation wherever it gives an image,
    # and surprise (no image) really occurs with both polarities.
    images = [(map_label(r["Emotion"], "meld7", "meld_sentiment3"), r["Sentiment"]) for r in rows]
    assert all(img == gold for img, gold in images if img is not None)
    assert {r["Sentiment"] for r in rows if r["Emotion"] == "surprise"} == {"positive", "negative"}
