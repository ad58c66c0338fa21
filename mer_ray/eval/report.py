"""Evaluate prediction files against gold labels: JSON, Markdown and plots.

Prediction files carry no gold; gold comes from the dataset and is joined on
(dialogue_id, turn). Several seeds aggregate into mean ± std.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.eval.metrics import aggregate_seeds, compute_metrics

HEADLINE = ("weighted_f1", "accuracy", "macro_f1", "uar", "war")


def evaluate_predictions(pred: pa.Table | str | Path, gold: pa.Table) -> dict:
    """Metrics of one predictions table/file against the gold ``label`` of ``gold``.

    Every prediction row must find its gold row, and every gold row with a label must be predicted:
    nothing is silently dropped.
    """
    if not isinstance(pred, pa.Table):
        pred = pq.read_table(pred)
    labels = json.loads(pred.schema.metadata[b"emotion_labels"])
    key = lambda t: list(zip(t.column("dialogue_id").to_pylist(), t.column("turn").to_pylist()))  # noqa: E731
    gmap = {k: g for k, g in zip(key(gold), gold.column("label").to_pylist()) if g not in (None, "")}
    pkeys = key(pred)
    missing = [k for k in pkeys if k not in gmap]
    if missing:
        raise ValueError(f"{len(missing)} predicted rows have no gold label, e.g. {missing[:3]}")
    unpredicted = set(gmap) - set(pkeys)
    if unpredicted:
        raise ValueError(f"{len(unpredicted)} gold rows were not predicted, e.g. {sorted(unpredicted)[:3]}")
    return compute_metrics([gmap[k] for k in pkeys], pred.column("emotion_pred").to_pylist(), labels)


def plot_confusion(confusion: Sequence[Sequence[float]], labels: Sequence[str], path: str | Path, title: str) -> None:
    """Row-normalised confusion matrix (gold rows, predicted columns) with counts, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{cm[i, j]:.0f}", ha="center", va="center", fontsize=8, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    fig.colorbar(im, ax=ax, label="fraction of gold row")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_per_class(per_class: dict[str, float], per_class_std: dict[str, float] | None, path: str | Path, title: str) -> None:
    """Bar chart of per-class F1 (percent), with seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(per_class)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    err = [per_class_std[k] for k in labels] if per_class_std else None
    ax.bar(labels, [per_class[k] for k in labels], yerr=err, capsize=3, color="#4c72b0")
    ax.set_ylabel("F1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_report(per_seed: dict[int, dict[str, dict]], out_dir: str | Path, title: str = "vanilla", extra: dict | None = None) -> dict:
    """Aggregate per-seed metrics (``{seed: {split: compute_metrics(...)}}``) and write
    ``report.json``, ``report.md``, ``confusion_<split>.png`` and ``per_class_f1_<split>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = sorted(per_seed)
    splits = list(per_seed[seeds[0]])
    report: dict = {"title": title, "seeds": seeds}
    for split in splits:
        runs = [per_seed[s][split] for s in seeds]
        agg = aggregate_seeds(runs)
        agg["per_seed"] = {str(s): {k: per_seed[s][split][k] for k in HEADLINE} for s in seeds}
        agg["confusion"] = np.sum([r["confusion"] for r in runs], axis=0).tolist()  # summed over seeds
        agg["labels"] = runs[0]["labels"]
        agg["n"] = runs[0]["n"]
        report[split] = agg
        plot_confusion(agg["confusion"], agg["labels"], out_dir / f"confusion_{split}.png", f"{title}: {split} (sum over {len(seeds)} seed(s))")
        plot_per_class(agg["per_class_f1"], agg["per_class_f1_std"] if len(seeds) > 1 else None,
                       out_dir / f"per_class_f1_{split}.png", f"{title}: {split} per-class F1")
    report.update(extra or {})
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(to_markdown(report, splits))
    return report


def probe_markdown(block: dict, splits: Sequence[str], n_seeds: int) -> list[str]:
    """The "Linear probe" section of ``report.md``: model vs probe per split and, in bold, each loss."""
    lines = ["", "## Linear probe (same features, single utterance, no context)", ""]
    if "skipped" in block:
        return lines + [f"Not computed: {block['skipped']}."]
    flags = [f"**Warning ({s}): {block[s]['verdict']}**" for s in splits if s in block and block[s]["model_loses"]]
    for f in flags:  # one paragraph each
        lines += [f, ""]
    lines += [f"scikit-learn median imputation + missing indicators, StandardScaler and LogisticRegression "
              f"(C={block['C']:g}, chosen on {block['C_selected_on']}) on {', '.join(f'`{c}`' for c in block['columns'])}, "
              f"trained on {block['n_train']} train rows; model: mean of {n_seeds} seed(s). Δ = model − probe, in points.", ""]
    if block.get("empty_columns"):
        lines += [f"Columns with no value on train, left out: {', '.join(block['empty_columns'])}.", ""]
    lines += ["| split | | weighted F1 | accuracy | macro F1 |", "|---|---|---|---|---|"]
    for s in splits:
        if s in block:
            c = block[s]
            lines.append(f"| {s} | model | " + " | ".join(f"{c['model'][k]:.2f}" for k in ("weighted_f1", "accuracy", "macro_f1")) + " |")
            lines.append(f"| {s} | linear probe | " + " | ".join(f"{c['probe'][k]:.2f}" for k in ("weighted_f1", "accuracy", "macro_f1")) + " |")
            lines.append(f"| {s} | Δ | " + " | ".join(f"{c['delta'][k]:+.2f}" for k in ("weighted_f1", "accuracy", "macro_f1")) + " |")
    for s in splits:
        if s in block and not block[s]["model_loses"]:
            lines += ["", block[s]["verdict"]]
    return lines


def to_markdown(report: dict, splits: Sequence[str]) -> str:
    """A human-readable summary of a report."""
    lines = [f"# {report['title']}", "", f"Seeds: {report['seeds']}", ""]
    lines += ["| split | weighted F1 | accuracy | macro F1 | UAR | WAR | n |", "|---|---|---|---|---|---|---|"]
    for s in splits:
        r = report[s]
        cells = [f"{r[k]:.2f} ± {r[k + '_std']:.2f}" for k in HEADLINE]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {r['n']} |")
    if "probe" in report:
        lines += probe_markdown(report["probe"], splits, len(report["seeds"]))
    for s in splits:
        r = report[s]
        lines += ["", f"## {s}: per seed", "", "| seed | weighted F1 | accuracy | macro F1 |", "|---|---|---|---|"]
        lines += [f"| {seed} | {v['weighted_f1']:.2f} | {v['accuracy']:.2f} | {v['macro_f1']:.2f} |" for seed, v in r["per_seed"].items()]
        lines += ["", f"## {s}: per-class F1 (mean over seeds)", "", "| class | F1 |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} ± {r['per_class_f1_std'][k]:.2f} |" for k, v in r["per_class_f1"].items()]
        lines += ["", f"![confusion {s}](confusion_{s}.png) ![per-class F1 {s}](per_class_f1_{s}.png)"]
    if "stage_seconds" in report:
        lines += ["", "## Stage wall seconds", ""] + [f"- {k}: {v:.1f}" for k, v in report["stage_seconds"].items()]
    if "wall_seconds" in report:
        lines += [f"- total: {report['wall_seconds']:.1f}"]
    return "\n".join(lines) + "\n"
