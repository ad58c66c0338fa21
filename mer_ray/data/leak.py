"""Keep gold annotations away from a model's inputs.

The rule: gold labels of the split being predicted never reach a model's inputs
(features, prompts, LLM references, Serve requests). Every stage that builds
model inputs from a loaded table calls :func:`strip_gold` first, and every
stage that takes a table it did not build calls :func:`assert_no_gold` on it.
Evaluation joins the gold back from the loader by ``(dialogue_id, turn)``.

A column is gold when its name (case-insensitive) is one of
:data:`mer_ray.data.schema.GOLD_COLUMNS` or an alias such as MELD's raw
``Emotion``, or starts with ``gold`` or ``label_``. Predictions
(``emotion_probs``, ``emotion_pred``, ``sentiment_probs``, ``vad``) are not gold.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from mer_ray.data.schema import GOLD_COLUMNS

#: Other names that carry gold annotations (MELD's raw CSV, common spellings).
GOLD_ALIASES: tuple[str, ...] = ("emotion",)
_PREFIXES = ("gold", "label_")


class GoldLeakError(RuntimeError):
    """Gold columns reached a place that builds a model's inputs."""


def is_gold_column(name: str) -> bool:
    """Whether a column named ``name`` carries gold annotations."""
    low = name.lower()
    return low in GOLD_COLUMNS or low in GOLD_ALIASES or low.startswith(_PREFIXES)


def _column_names(obj: Any) -> list[str]:
    if isinstance(obj, (pa.Table, pa.RecordBatch)):
        return list(obj.column_names)
    if isinstance(obj, pa.Schema):
        return list(obj.names)
    if isinstance(obj, Mapping):
        return [str(k) for k in obj]
    if hasattr(obj, "columns"):  # pandas.DataFrame
        return [str(c) for c in obj.columns]
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, Iterable):
        return [str(c) for c in obj]
    raise TypeError(f"cannot read column names from {type(obj).__name__}")


def gold_columns(obj: Any) -> list[str]:
    """The gold columns of a table, schema, batch dict, DataFrame or list of column names."""
    return [c for c in _column_names(obj) if is_gold_column(c)]


def strip_gold(table: Any) -> Any:
    """Return ``table`` without its gold columns (same type: Arrow table, batch dict or DataFrame)."""
    gold = gold_columns(table)
    if not gold:
        return table
    if isinstance(table, pa.Table):
        return table.drop_columns(gold)
    if isinstance(table, pa.RecordBatch):
        return table.drop_columns(gold)
    if isinstance(table, Mapping):
        return {k: v for k, v in table.items() if k not in gold}
    if hasattr(table, "drop"):
        return table.drop(columns=gold)
    raise TypeError(f"cannot strip gold columns from {type(table).__name__}")


def assert_no_gold(table_or_columns: Any, where: str) -> None:
    """Raise :class:`GoldLeakError` if any gold column is present.

    Args:
        table_or_columns: an Arrow table/schema/record batch, a batch dict, a DataFrame, or
            column names.
        where: what is about to consume it (e.g. ``"vanilla model inputs"``); named in the error.
    """
    gold = gold_columns(table_or_columns)
    if gold:
        raise GoldLeakError(
            f"gold column(s) {gold} reached {where}; gold labels must never reach a model's inputs. "
            "Drop them with mer_ray.data.leak.strip_gold() and join gold back only for evaluation."
        )
