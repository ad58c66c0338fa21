"""Label sets as data, and the written-down mappings between them.

A mapping sends each source label to a target label, or to ``None`` when the
target set has no counterpart (the utterance is then excluded from a
cross-set evaluation, never silently relabelled). Every mapping is total over
its source set; ``tests/test_labels.py`` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelSet:
    """An ordered label set. The order is the order of every probability vector."""

    name: str
    labels: tuple[str, ...]
    description: str = ""

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise ValueError(f"unknown label {label!r} for label set {self.name!r}; expected one of {list(self.labels)}") from None

    def __len__(self) -> int:
        return len(self.labels)


LABEL_SETS: dict[str, LabelSet] = {
    s.name: s
    for s in [
        LabelSet("meld7", ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"), "MELD emotions (Poria et al., 2019)"),
        LabelSet("meld_sentiment3", ("neutral", "positive", "negative"), "MELD sentiment"),
        LabelSet("iemocap6", ("happy", "sad", "neutral", "angry", "excited", "frustrated"), "IEMOCAP 6-way, as in DialogueRNN/Lantern"),
        LabelSet("iemocap4", ("happy", "sad", "neutral", "angry"), "IEMOCAP 4-way: excited merged into happy"),
        LabelSet("emorynlp7", ("neutral", "joyful", "peaceful", "powerful", "scared", "mad", "sad"), "EmoryNLP (Zahiri & Choi, 2018)"),
    ]
}

#: Written-down mappings, (source, target) -> {source label: target label or None}.
MAPPINGS: dict[tuple[str, str], dict[str, str | None]] = {
    # Standard IEMOCAP 4-way protocol: excited joins happy; frustrated has no class.
    ("iemocap6", "iemocap4"): {"happy": "happy", "excited": "happy", "sad": "sad", "neutral": "neutral", "angry": "angry", "frustrated": None},
    # MELD emotion -> MELD sentiment, the polarity the MELD annotation guide gives each emotion.
    # Surprise is annotated with either polarity in MELD, so it has no fixed image.
    ("meld7", "meld_sentiment3"): {"neutral": "neutral", "joy": "positive", "surprise": None, "anger": "negative",
                                   "sadness": "negative", "disgust": "negative", "fear": "negative"},
    # EmoryNLP uses Willcox's feeling wheel; the six MELD-compatible pairs follow the
    # MELD paper's own alignment (Poria et al., 2019, sec. 3). peaceful and powerful
    # have no Ekman counterpart.
    ("emorynlp7", "meld7"): {"neutral": "neutral", "joyful": "joy", "peaceful": None, "powerful": None, "scared": "fear", "mad": "anger", "sad": "sadness"},
    ("meld7", "emorynlp7"): {"neutral": "neutral", "joy": "joyful", "surprise": None, "anger": "mad", "sadness": "sad", "disgust": None, "fear": "scared"},
    ("meld7", "iemocap4"): {"neutral": "neutral", "joy": "happy", "surprise": None, "anger": "angry", "sadness": "sad", "disgust": None, "fear": None},
    ("iemocap4", "meld7"): {"neutral": "neutral", "happy": "joy", "angry": "anger", "sad": "sadness"},
}


def get_label_set(name: str) -> LabelSet:
    """Look up a label set by name, with an error that lists the known ones."""
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; known: {sorted(LABEL_SETS)}") from None


def map_label(label: str, source: str, target: str) -> str | None:
    """Map ``label`` from set ``source`` to set ``target`` (``None``: no counterpart)."""
    if source == target:
        get_label_set(source).index(label)
        return label
    try:
        mapping = MAPPINGS[(source, target)]
    except KeyError:
        raise ValueError(f"no written-down mapping from {source!r} to {target!r}; known: {sorted(MAPPINGS)}") from None
    if label not in mapping:
        raise ValueError(f"unknown label {label!r} for label set {source!r}")
    return mapping[label]
