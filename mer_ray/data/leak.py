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

import re
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from mer_ray.data.schema import GOLD_COLUMNS

#: Other names that carry gold annotations (MELD's raw CSV, common spellings).
GOLD_ALIASES: tuple[str, ...] = ("emotion",)
_PREFIXES = ("gold", "label_")


class GoldLeakError(RuntimeError):
    """Gold columns (or, from :func:`assert_no_canaries`, gold values: ``.found``) reached a model's inputs."""

    found: list[str] = []


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


def canary_gold(table: pa.Table) -> tuple[pa.Table, set[str]]:
    """For leak tests: replace every gold value with a unique, recognisable canary.

    String gold becomes ``"CANARY_<column>_<row>_"``; float gold becomes a float with eleven
    distinct digits (``0.<6 digits from row and column>13579``) that only a copy would reproduce.
    Feed the result to the code that builds model inputs and check its output with
    :func:`assert_no_canaries`.

    Returns:
        The table with canaries, and the canaries as strings.
    """
    canaries: set[str] = set()
    for j, name in enumerate(gold_columns(table)):
        col, n = table[name], table.num_rows
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            values = [f"CANARY_{name}_{i}_" for i in range(n)]
        elif pa.types.is_floating(col.type):
            values = [float(f"0.{(271828 + 7919 * i + 131071 * j) % 10**6:06d}13579") for i in range(n)]
        else:
            continue
        canaries.update(map(str, values))
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, col.type))
    return table, canaries


def assert_no_canaries(values: Any, canaries: set[str], where: str) -> None:
    """Raise :class:`GoldLeakError` if any canary from :func:`canary_gold` occurs in ``values``.

    ``values`` is searched as text: a string, or any nesting of lists/dicts/tables rendered with
    ``repr``. Float canaries are matched by their full ``repr`` (a rounded copy goes unseen).
    """
    if isinstance(values, (pa.Table, pa.RecordBatch)):
        values = values.to_pylist()
    text = values if isinstance(values, str) else repr(values)
    found = sorted(set(re.findall(r"CANARY_\w+?_\d+_|0\.\d{6}13579", text)) & canaries, key=lambda c: (c[0] == "0", c))
    if found:
        err = GoldLeakError(f"{len(found)} gold value(s) reached {where}, e.g. {found[:5]}")
        err.found = found
        raise err
