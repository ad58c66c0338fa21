"""The utterance schema: one Arrow row per utterance, keyed by (dialogue_id, turn).

Every loader returns a ``pyarrow.Table`` with (a superset of) these columns, in
dialogue order. Optional columns are present and null where a dataset lacks them,
so later stages never branch on a column's existence.
"""

from __future__ import annotations

import pyarrow as pa

#: Required columns and their Arrow types.
REQUIRED: dict[str, pa.DataType] = {
    "dialogue_id": pa.string(),
    "turn": pa.int64(),
    "speaker": pa.string(),
    "text": pa.string(),
}

#: Optional columns and their Arrow types (null where absent).
OPTIONAL: dict[str, pa.DataType] = {
    "video": pa.string(),  # path, relative to a media root
    "start": pa.float64(),  # seconds into ``video``/``audio``
    "end": pa.float64(),
    "audio": pa.string(),
    "label": pa.string(),  # gold emotion
    "sentiment": pa.string(),  # gold sentiment
    "valence": pa.float64(),
    "arousal": pa.float64(),
    "dominance": pa.float64(),
}

#: Columns that carry gold annotations. They must never reach a model's inputs
#: for the split being predicted (see ``mer_ray.data.leak``).
GOLD_COLUMNS: tuple[str, ...] = ("label", "sentiment", "valence", "arousal", "dominance")

SCHEMA = pa.schema([pa.field(k, v, nullable=(k in OPTIONAL)) for k, v in {**REQUIRED, **OPTIONAL}.items()])
