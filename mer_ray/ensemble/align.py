"""Ensemble members' distributions, aligned to one utterance order and one label order.

Every member file is in the vanilla prediction contract: ``dialogue_id``, ``turn``,
``emotion_probs`` (``list<float>``) and schema metadata ``emotion_labels`` (a JSON
list), and no gold column. One split's utterances (the *keys*) come from its gold
table; a member must cover each of them exactly once, and its columns are
reordered to the common label order by label name.

Shapes: ``N`` utterances of a split, ``C`` labels.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mer_ray.data.leak import assert_no_gold

Key = tuple[str, int]


class MemberError(ValueError):
    """A member file does not fit the split: wrong labels, duplicates or missing utterances."""


def natural_key(key: Key) -> tuple:
    """Sort key of ``(dialogue_id, turn)``: ``test/2`` before ``test/10`` (numbers compared as numbers)."""
    parts = re.split(r"(\d+)", key[0])
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != ""), key[1]


def split_keys(keys: Iterable[Key]) -> list[Key]:
    """The split's utterances in the one order used everywhere: dialogues grouped, turns ascending."""
    return sorted(set(keys), key=natural_key)


def member_labels(table: pa.Table | pa.Schema, where: str) -> list[str]:
    """The ``emotion_labels`` metadata of a prediction table or schema."""
    meta = (table if isinstance(table, pa.Schema) else table.schema).metadata or {}
    if b"emotion_labels" not in meta:
        raise MemberError(f"{where}: schema metadata lacks 'emotion_labels' (a JSON list); not a prediction file")
    return list(json.loads(meta[b"emotion_labels"]))


def read_member(path: str | Path | pa.Table, split: str, where: str | None = None) -> tuple[pa.Table, list[str]]:
    """Read one member's rows of ``split``; returns (table, its label order).

    Rows of other splits (by the ``split`` column, where present) are dropped. Dialogue ids without
    a ``<split>/`` prefix get one, so ``"12"`` and ``"test/12"`` name the same dialogue.

    Raises:
        GoldLeakError: the file holds gold columns.
        MemberError: metadata or columns are missing.
    """
    where = where or str(path)
    table = path if isinstance(path, pa.Table) else pq.read_table(path)
    assert_no_gold(table, f"the ensemble (member {where})")  # a prediction file never holds gold
    labels = member_labels(table, where)
    for col in ("dialogue_id", "turn", "emotion_probs"):
        if col not in table.column_names:
            raise MemberError(f"{where}: missing column {col!r}")
    if "split" in table.column_names and split in set(table["split"].to_pylist()):
        table = table.filter(pc.equal(table["split"], split))
    ids = [d if "/" in d else f"{split}/{d}" for d in table["dialogue_id"].to_pylist()]
    table = table.set_column(table.schema.get_field_index("dialogue_id"), "dialogue_id", pa.array(ids, pa.string()))
    return table, labels


def align(path: str | Path | pa.Table, split: str, keys: Sequence[Key], labels: Sequence[str],
          where: str | None = None) -> np.ndarray:
    """One member's distributions ``[N, C]`` in the order of ``keys`` and ``labels``.

    Args:
        path: the member's Parquet file (or a table).
        split: ``dev`` or ``test``.
        keys: the split's ``(dialogue_id, turn)`` in the common order (:func:`split_keys`).
        labels: the common label order (``C`` names).
        where: how errors name the member (default: the path).

    Raises:
        MemberError: labels differ from ``labels``, a key is duplicated or missing, or a row has
            the wrong number of probabilities. The message names the file.
    """
    where = where or str(path)
    table, own = read_member(path, split, where)
    if sorted(own) != sorted(labels) or len(own) != len(labels):
        raise MemberError(f"{where}: labels {own} differ from the ensemble's {list(labels)}")
    perm = [own.index(lab) for lab in labels]  # column j of the output is label labels[j]
    row_of: dict[Key, int] = {}
    for i, k in enumerate(zip(table["dialogue_id"].to_pylist(), table["turn"].to_pylist())):
        if k in row_of:
            raise MemberError(f"{where}: utterance {k} appears more than once in split {split!r}")
        row_of[k] = i
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise MemberError(f"{where}: misses {len(missing)} of {len(keys)} {split} utterances, e.g. {missing[:5]}")
    idx = pa.array([row_of[k] for k in keys], pa.int64())
    probs = table["emotion_probs"].take(idx).to_pylist()
    if any(p is None or len(p) != len(labels) for p in probs):
        raise MemberError(f"{where}: some emotion_probs are null or not of length {len(labels)}")
    return np.asarray(probs, dtype=np.float64)[:, perm]


def vanilla_paths(spec: str | Path | dict, splits: Sequence[str] = ("dev", "test")) -> dict[str, Path]:
    """``{split: file}`` of one vanilla seed: a directory of ``predictions_<split>.parquet``, one file
    holding every split (its ``split`` column tells them apart) or already a ``{split: file}`` dict."""
    if isinstance(spec, dict):
        return {s: Path(spec[s]) for s in splits}
    p = Path(spec)
    if p.is_dir():
        return {s: p / f"predictions_{s}.parquet" for s in splits}
    return {s: p for s in splits}


def seed_name(path: str | Path, fallback: int) -> str:
    """``vanilla_seed<k>`` from the file's ``seed`` metadata, else from its position."""
    meta = pq.read_schema(path).metadata or {}
    seed = meta.get(b"seed")
    return f"vanilla_seed{seed.decode() if seed else fallback}"
