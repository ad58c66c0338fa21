"""Rewrite an ensemble evidence directory's distributions as the calibrated ones (``mer calibrate --evidence``).

The evidence (``report/`` of an ``mer ensemble`` run, or its committed copy) holds
``{dev,test}_predictions.parquet`` with a ``probs_<row>`` column per ablation row. Each row with a
temperature (``ensemble``, ``vanilla_avg``, ``lantern`` and the other LLM members) is replaced by its
calibrated distribution, and the original kept as ``uncalibrated_probs_<row>``; rewriting again starts
from those copies, so it never calibrates twice. ``report.json`` gets the rows' metrics recomputed
(temperature scaling keeps every argmax, so they are unchanged) and a ``calibration`` block with ECE
and NLL before and after.

Shapes: ``N`` utterances of a split, ``C`` labels.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.calibration.artifacts import CALIBRATION_FILE, Calibration
from mer_ray.calibration.reliability import ece, nll
from mer_ray.calibration.sources import ENSEMBLE_COLUMNS, UNCALIBRATED, Key

HEADLINE = ("weighted_f1", "accuracy", "macro_f1")
MD_SECTION = "## Calibration (temperature scaling)"


def evidence_columns(cal: Calibration, names: list[str]) -> dict[str, str]:
    """Ablation row -> the distribution name whose temperature it takes (rows without one are left as they are)."""
    by_row = {}
    for name in cal.temperatures:
        row = ENSEMBLE_COLUMNS.get(name, name)
        if row in names and row not in by_row:
            by_row[row] = name  # vanilla_avg is both final_no_llm and vanilla: the first (same T) wins
    return by_row


def _score(y: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    from mer_ray.eval.metrics import compute_metrics

    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    m = compute_metrics([labels[i] for i in y], [labels[i] for i in probs.argmax(1)], labels)
    return {k: m[k] for k in HEADLINE}


def calibrate_evidence(evidence_dir: str | Path, cal: Calibration, gold: dict[str, dict[Key, str]],
                       calibration_file: str | None = None) -> dict:
    """Rewrite ``evidence_dir``'s prediction tables and ``report.json`` with calibrated distributions.

    Args:
        evidence_dir: holds ``report.json`` and ``{dev,test}_predictions.parquet``.
        cal: the fitted calibration (of the run the evidence came from).
        gold: ``{split: {(dialogue_id, turn): label}}``, for the metrics only.
        calibration_file: where ``cal`` is stored, recorded in the report.

    Returns:
        The ``calibration`` block written into ``report.json``.
    """
    ev = Path(evidence_dir)
    report = json.loads((ev / "report.json").read_text())
    labels = list(report["labels"])
    rows = evidence_columns(cal, list(report["rows"]))
    block: dict = {"file": calibration_file or CALIBRATION_FILE, "temperatures": {r: cal.temperatures[n] for r, n in rows.items()},
                   "distribution_names": rows, "uncalibrated_columns": {r: f"{UNCALIBRATED}probs_{r}" for r in rows},
                   "note": "probs_<row> of these rows are temperature-scaled (T fitted on dev; dev rows use the same T as "
                           "test, as served); argmax, hence every classification metric, is unchanged"}
    for split in ("dev", "test"):
        path = ev / f"{split}_predictions.parquet"
        if not path.exists():
            continue
        t = pq.read_table(path)
        keys = list(zip(t["dialogue_id"].to_pylist(), t["turn"].to_pylist()))
        y = np.array([labels.index(gold[split][k]) for k in keys])
        block[split] = {}
        for row, name in rows.items():
            col, unc = f"probs_{row}", f"{UNCALIBRATED}probs_{row}"
            raw_col = t[unc] if unc in t.column_names else t[col]
            raw = np.asarray(raw_col.to_pylist(), dtype=np.float64)
            after = cal.calibrate(name, raw)
            if (after.argmax(1) != raw.argmax(1)).any():
                raise AssertionError(f"{path}: calibrating {col} changed an argmax")
            arr = pa.array(list(after.astype(np.float32)), pa.list_(pa.float32()))
            t = t.set_column(t.schema.get_field_index(col), col, arr)
            if unc not in t.column_names:
                t = t.append_column(unc, raw_col)
            report.setdefault(split, {})[row] = _score(y, after, labels)
            block[split][row] = {"ece_before": ece(raw, y), "ece_after": ece(after, y), "nll_before": nll(raw, y),
                                 "nll_after": nll(after, y)}
        meta = dict(t.schema.metadata or {})
        meta[b"calibration"] = json.dumps({"temperatures": block["temperatures"], "file": block["file"]}).encode()
        tmp = path.with_suffix(".tmp")
        pq.write_table(t.replace_schema_metadata(meta), tmp)
        tmp.rename(path)
    report["calibration"] = block
    (ev / "report.json").write_text(json.dumps(report, indent=2))
    md = ev / "report.md"
    if md.exists():
        text = md.read_text().split(MD_SECTION)[0].rstrip() + "\n\n" + _markdown(block) + "\n"
        md.write_text(text)
    return block


def _markdown(block: dict) -> str:
    lines = [MD_SECTION, "", f"Rows rewritten as calibrated (uncalibrated copies kept as `{UNCALIBRATED}probs_<row>`); "
             "temperatures fitted on dev. Test, 15-bin top-label ECE and NLL:", "",
             "| row | T | ECE before | ECE after | NLL before | NLL after |", "|---|---|---|---|---|---|"]
    for row, m in block.get("test", {}).items():
        lines.append(f"| {row} | {block['temperatures'][row]:.3f} | {100 * m['ece_before']:.2f}% | {100 * m['ece_after']:.2f}% | "
                     f"{m['nll_before']:.4f} | {m['nll_after']:.4f} |")
    return "\n".join(lines)


def gold_of(cal: Calibration, src) -> dict[str, dict[Key, str]]:
    """``{split: {(dialogue_id, turn): label}}`` of loaded sources' dev and test (the metrics' gold)."""
    return {s: dict(zip(d.keys, (cal.labels[i] for i in d.y))) for s, d in (("dev", src.dev), ("test", src.test)) if d is not None}


def calibrate_run_evidence(run_dir: str | Path, evidence_dir: str | Path, **sources) -> dict:
    """Rewrite an ``mer ensemble`` run's evidence copy with the run's stored calibration (what the recipe calls).

    ``sources`` (``meld=DIR`` or ``gold=...``) go to :func:`~mer_ray.calibration.sources.load_sources`, for the gold.
    """
    from mer_ray.calibration.sources import load_sources

    cal = Calibration.load(run_dir)
    if cal is None:
        raise FileNotFoundError(f"{Path(run_dir) / CALIBRATION_FILE} is missing: run mer calibrate --models {run_dir} first")
    return calibrate_evidence(evidence_dir, cal, gold_of(cal, load_sources(run_dir, **sources)), str(Path(run_dir) / CALIBRATION_FILE))

