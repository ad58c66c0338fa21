"""A linear-probe baseline: standardised logistic regression on the model's own feature columns.

Each utterance alone (no dialogue context): its feature columns are concatenated,
missing cells are imputed with the train median plus a missing indicator, every
dimension is standardised on train, and a ``LogisticRegression`` is fitted on the
train split. Its ``C`` is chosen on dev's weighted F1 (never on test). Scoring uses
the same join and metrics as the model (:func:`mer_ray.eval.report.evaluate_predictions`),
so the two numbers are comparable row for row.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mer_ray.data.schema import GOLD_COLUMNS
from mer_ray.features.columns import MODEL_FEATURES

#: Frozen feature-store columns a model can read, in a fixed order.
FEATURE_COLUMNS: tuple[str, ...] = MODEL_FEATURES
#: The ``C`` values tried (ascending; a tie on dev keeps the stronger regularisation).
C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: Metrics compared between model and probe.
COMPARED: tuple[str, ...] = ("weighted_f1", "accuracy", "macro_f1")


def probe_features(modalities: Sequence[str], encoder: str, store_columns: Sequence[str]) -> list[str]:
    """The feature columns the probe reads for a model config.

    Args:
        modalities: the model's frozen columns (``VanillaConfig.modalities``).
        encoder: ``frozen`` (the model reads ``modalities``), or a text encoder
            (``minilm``/``tiny``: the model reads tokens, so the probe reads the
            store's ``text_embedding`` in their place, plus ``modalities``).
        store_columns: the feature store's column names.

    Raises:
        ValueError: a column is missing from the store (the message names it).
    """
    cols = list(modalities) if encoder == "frozen" else ["text_embedding", *[m for m in modalities if m != "text_embedding"]]
    lacking = [c for c in cols if c not in store_columns]
    if lacking:
        raise ValueError(f"the feature store lacks {lacking} (has {sorted(c for c in store_columns if c in FEATURE_COLUMNS)})")
    if not cols:
        raise ValueError("the model reads no feature column")
    return cols


def default_features(store_columns: Sequence[str]) -> list[str]:
    """The model-readable feature columns present in a store, in :data:`FEATURE_COLUMNS` order."""
    return [c for c in FEATURE_COLUMNS if c in store_columns]


def column_matrix(table: pa.Table, column: str, width: int | None = None) -> np.ndarray:
    """``[N, d]`` float64 of one list column; NaN where the cell is null or empty (never zero).

    Args:
        table: the rows.
        column: a list-of-floats column.
        width: the expected ``d`` (a fitted probe's); None: the cells' own (1 when all are missing).

    Raises:
        ValueError: the cells have different lengths, or not ``width``.
    """
    arr = table.column(column).combine_chunks()
    if pa.types.is_null(arr.type):
        return np.full((len(arr), width or 1), np.nan)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    present = lengths > 0
    dims = set(lengths[present].tolist()) | ({width} if width and present.any() else set())
    if len(dims) > 1:
        raise ValueError(f"{column} has cells of lengths {sorted(dims)}; expected one width")
    out = np.full((len(arr), dims.pop() if dims else (width or 1)), np.nan)
    if present.any():
        cells = arr.filter(pa.array(present))
        out[present] = cells.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(int(present.sum()), -1)
    return out


def _matrix(table: pa.Table, columns: Sequence[str], widths: Sequence[int]) -> np.ndarray:
    return np.concatenate([column_matrix(table, c, w) for c, w in zip(columns, widths)], axis=1)


@dataclass
class Probe:
    """A fitted probe.

    Attributes:
        pipeline: the sklearn ``Pipeline`` (per-column imputer + indicator, scaler, logistic regression).
        C: the chosen inverse regularisation strength.
        columns: the feature columns read, in order (columns empty on train are left out).
        widths: each column's width.
        labels: the label set, in its canonical order.
        n_train: train rows used (those with a gold label in ``labels``).
        dev_weighted_f1: dev weighted F1 (percent) per ``C`` tried; empty without dev.
        empty_columns: requested columns with no value in any train row (carry nothing; left out).
        converged: whether the chosen fit converged within ``max_iter``.
    """

    pipeline: object
    C: float
    columns: list[str]
    widths: list[int]
    labels: list[str]
    n_train: int
    dev_weighted_f1: dict[str, float] = field(default_factory=dict)
    empty_columns: list[str] = field(default_factory=list)
    converged: bool = True

    def predict(self, table: pa.Table) -> np.ndarray:
        """Predicted labels of every row of ``table``; only the feature columns are read."""
        return np.asarray(self.pipeline.predict(_matrix(table, self.columns, self.widths)), dtype=object)

    def predict_proba(self, table: pa.Table) -> np.ndarray:
        """``[N, len(labels)]`` probabilities in ``labels`` order (a label absent from train gets 0)."""
        p = self.pipeline.predict_proba(_matrix(table, self.columns, self.widths))
        out = np.zeros((table.num_rows, len(self.labels)))
        classes = list(self.pipeline.classes_)
        for j, lab in enumerate(self.labels):
            if lab in classes:
                out[:, j] = p[:, classes.index(lab)]
        return out

    def predictions_table(self, table: pa.Table) -> pa.Table:
        """Keys (``dialogue_id``, ``turn``, and ``split`` when present) and ``emotion_pred``, with metadata
        ``emotion_labels``: the shape :func:`mer_ray.eval.report.evaluate_predictions` reads."""
        keys = {c: table.column(c) for c in ("dialogue_id", "turn", "split") if c in table.column_names}
        keys["emotion_pred"] = pa.array(self.predict(table).tolist(), pa.string())
        return pa.table(keys).replace_schema_metadata({"emotion_labels": json.dumps(self.labels), "model": "linear_probe"})


def _labelled(table: pa.Table, labels: Sequence[str]) -> pa.Table:
    return table.filter(pc.is_in(table.column("label"), pa.array(list(labels), pa.string())))


def _pipeline(widths: list[int], names: list[str], C: float, seed: int, max_iter: int):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    starts = np.cumsum([0, *widths])
    impute = ColumnTransformer([(n, SimpleImputer(strategy="median", add_indicator=True), list(range(a, b)))
                                for n, a, b in zip(names, starts[:-1], starts[1:])])
    return Pipeline([("impute", impute), ("scale", StandardScaler()),
                     ("logreg", LogisticRegression(C=C, max_iter=max_iter, random_state=seed))])


def fit_probe(train_table: pa.Table, columns: Sequence[str], labels: Sequence[str], seed: int = 0,
              dev_table: pa.Table | None = None, grid: Sequence[float] = C_GRID, max_iter: int = 2000) -> Probe:
    """Fit the probe on the train rows whose gold ``label`` is in ``labels``.

    Args:
        train_table: train rows with ``label`` and the feature columns.
        columns: feature columns (lists of floats, null where missing).
        labels: the label set; other rows (empty label, another set) do not train.
        seed: ``random_state`` of the logistic regression.
        dev_table: rows scoring each ``C`` of ``grid`` by weighted F1; None: ``C=1``.
        grid: the ``C`` values tried on dev.
        max_iter: ``LogisticRegression`` iterations.

    Raises:
        ValueError: a gold column is asked for as a feature, no feature column has a value on
            train, or fewer than two classes are left to train on.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import f1_score

    labels = list(labels)
    gold = sorted(set(columns) & set(GOLD_COLUMNS))
    if gold:
        raise ValueError(f"gold columns {gold} cannot be probe features")
    train = _labelled(train_table, labels)
    y = np.asarray(train.column("label").to_pylist(), dtype=object)
    if len(set(y)) < 2:
        raise ValueError(f"{train.num_rows} train rows with a label in {labels} cover {len(set(y))} class(es); need 2")
    mats = {c: column_matrix(train, c) for c in columns}
    empty = [c for c, m in mats.items() if np.isnan(m).all()]
    used = [c for c in columns if c not in empty]
    if not used:
        raise ValueError(f"no feature column {list(columns)} has a value in any of the {train.num_rows} train rows")
    x = np.concatenate([mats[c] for c in used], axis=1)
    widths = [mats[c].shape[1] for c in used]
    dev = _labelled(dev_table, labels) if dev_table is not None else None
    candidates = list(grid) if dev is not None and dev.num_rows else [1.0]
    fits, scores = [], {}
    for C in candidates:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            pipe = _pipeline(widths, used, C, seed, max_iter).fit(x, y)
        fits.append(pipe)
        if len(candidates) > 1:
            pred = pipe.predict(_matrix(dev, used, widths))
            scores[str(C)] = 100.0 * f1_score(dev.column("label").to_pylist(), pred, labels=labels, average="weighted", zero_division=0)
    best = int(np.argmax([scores[str(C)] for C in candidates])) if scores else 0  # first maximum: smallest C
    pipe = fits[best]
    return Probe(pipe, float(candidates[best]), used, widths, labels, train.num_rows, scores, empty,
                 bool(np.all(pipe[-1].n_iter_ < max_iter)))


def probe_metrics(probe: Probe, inputs: dict[str, pa.Table], gold: pa.Table) -> dict[str, dict]:
    """Metrics of the probe per split, exactly as the model's (``evaluate_predictions`` -> ``compute_metrics``).

    Args:
        probe: a fitted probe.
        inputs: ``{split: rows to predict}``; their gold columns are dropped before the probe sees them.
        gold: the gold source (``dialogue_id``, ``turn``, ``label`` and, with several splits, ``split``).
    """
    from mer_ray.eval.report import evaluate_predictions

    out = {}
    for split, table in inputs.items():
        table = table.drop_columns([c for c in GOLD_COLUMNS if c in table.column_names])
        g = gold.filter(pc.equal(gold.column("split"), split)) if "split" in gold.column_names else gold
        out[split] = evaluate_predictions(probe.predictions_table(table), g)
    return out


def compare(model: dict, probe: dict) -> dict:
    """Model against probe on one split (both ``compute_metrics``-shaped, the model's may be a seed mean).

    Returns:
        ``{"model": {...}, "probe": {...}, "delta": {...}, "model_loses": bool, "verdict": str}``: weighted F1,
        accuracy and macro F1 in percent, ``delta`` = model - probe in points; the model loses when its
        accuracy or its weighted F1 is below the probe's.

    Raises:
        ValueError: the two were scored on different numbers of rows.
    """
    if model.get("n") != probe.get("n"):
        raise ValueError(f"model scored on {model.get('n')} rows, probe on {probe.get('n')}: not comparable")
    delta = {k: float(model[k] - probe[k]) for k in COMPARED}
    loses = delta["accuracy"] < 0 or delta["weighted_f1"] < 0
    nums = (f"weighted F1 {model['weighted_f1']:.2f} vs {probe['weighted_f1']:.2f} ({delta['weighted_f1']:+.2f} points), "
            f"accuracy {model['accuracy']:.2f} vs {probe['accuracy']:.2f} ({delta['accuracy']:+.2f} points)")
    if loses:
        verdict = f"The model loses to its linear probe on the same features: {nums}."
    elif delta["accuracy"] > 0 and delta["weighted_f1"] > 0:
        verdict = f"The model beats its linear probe on the same features: {nums}."
    else:
        verdict = f"The model only ties with its linear probe on the same features: {nums}."
    return {"model": {k: float(model[k]) for k in COMPARED}, "probe": {**{k: float(probe[k]) for k in COMPARED}, "n": probe["n"]},
            "delta": delta, "model_loses": bool(loses), "verdict": verdict}


def probe_block(report: dict, probe: Probe, metrics: dict[str, dict]) -> dict:
    """``report["probe"]``: ``{split: compare(...)}`` for each split in ``metrics``, and how the probe was fitted."""
    block: dict = {split: compare(report[split], m) for split, m in metrics.items()}
    block.update({"columns": probe.columns, "C": probe.C, "C_selected_on": "dev" if probe.dev_weighted_f1 else "none (no dev rows; C=1)",
                  "dev_weighted_f1_by_C": probe.dev_weighted_f1, "n_train": probe.n_train, "empty_columns": probe.empty_columns,
                  "converged": probe.converged})
    return block


def summary_lines(block: dict | None, splits: Sequence[str]) -> list[str]:
    """Short lines for a CLI: each split's probe scores and model - probe, the loss flagged in capitals."""
    if not block:
        return []
    if "skipped" in block:
        return [f"linear probe: not computed ({block['skipped']})"]
    lines = []
    for s in splits:
        if s in block:
            c = block[s]
            lines.append(f"{s} linear probe ({', '.join(block['columns'])}; C={block['C']:g}): weighted F1 {c['probe']['weighted_f1']:.2f}, "
                         f"accuracy {c['probe']['accuracy']:.2f}, macro F1 {c['probe']['macro_f1']:.2f}; model - probe: "
                         f"{c['delta']['weighted_f1']:+.2f} wF1, {c['delta']['accuracy']:+.2f} acc, {c['delta']['macro_f1']:+.2f} mF1")
            if c["model_loses"]:
                lines.append(f"WARNING ({s}): {c['verdict']}")
    return lines
