"""The ensemble's evidence: prediction tables, ``report.json``, ``report.md`` and ``ablation.png``.

Rows of the ablation, each a column ``probs_<name>`` of the prediction tables:
every vanilla seed (``vanilla_seed<k>``), their average (``vanilla_avg``), each LLM
member alone (``lantern``, ``farcer``, ...), the vanilla average fused with each
LLM member (``fused_<member>``) and the full ensemble (``ensemble``). On dev the
fused rows are out-of-fold predictions. Prediction tables hold no gold; gold is
only used here for scoring.

Shapes: ``N`` utterances of a split, ``C`` labels.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.ensemble.bootstrap import N_BOOT, SEED, ensemble_gains
from mer_ray.eval.metrics import compute_metrics

Key = tuple[str, int]
HEADLINE = ("weighted_f1", "accuracy", "macro_f1")
NOTES = [
    "Gold labels of past utterances are never used as inputs: every member sees only predictions and text. "
    "The FARCER paper's 70.01 weighted F1 on MELD used gold past labels and is not comparable.",
    "Fused rows are fitted on dev only (k-fold cross-fitting over dialogues, selection by held-out weighted F1 "
    "with vanilla-only among the candidates), refit on all of dev and applied once to test; test gold is used "
    "for scoring only.",
    "Dev numbers of fused rows are out-of-fold predictions of the setting selected on those same folds "
    "(slightly optimistic); test numbers are not.",
    "CIs: paired bootstrap over test dialogues (resampled with replacement), percentile 95% interval.",
]


def check_names(names: Sequence[str], seeds: Sequence[str]) -> None:
    """Column names: the vanilla ones are exactly the seeds and ``vanilla_avg``; ``ensemble`` is present."""
    bad = [n for n in names if n.startswith("vanilla") and n not in (*seeds, "vanilla_avg")]
    if bad:
        raise ValueError(f"only the vanilla seeds and vanilla_avg may be named vanilla*; got {bad}")
    if "ensemble" not in names or len(set(names)) != len(names):
        raise ValueError(f"columns must be unique and include 'ensemble'; got {list(names)}")


def write_predictions(path: str | Path, keys: Sequence[Key], columns: dict[str, np.ndarray],
                      labels: Sequence[str], split: str) -> Path:
    """One row per utterance: ``dialogue_id``, ``turn``, ``probs_<name>`` (``list<float>``, ``C`` in ``labels`` order)."""
    arrays = {"dialogue_id": pa.array([k[0] for k in keys], pa.string()), "turn": pa.array([k[1] for k in keys], pa.int64())}
    for name, p in columns.items():
        if p.shape != (len(keys), len(labels)):
            raise ValueError(f"probs_{name}: shape {p.shape}, expected {(len(keys), len(labels))}")
        arrays[f"probs_{name}"] = pa.array(list(p.astype(np.float32)), pa.list_(pa.float32()))
    table = pa.table(arrays).replace_schema_metadata({"emotion_labels": json.dumps(list(labels)), "split": split})
    path = Path(path)
    pq.write_table(table, path)
    return path


def score(y: np.ndarray, probs: np.ndarray, labels: Sequence[str]) -> dict:
    """Weighted F1, accuracy and macro F1 (%) of ``argmax probs [N, C]`` against gold indices ``y [N]``."""
    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    m = compute_metrics([labels[i] for i in y], [labels[i] for i in probs.argmax(1)], list(labels))
    return {k: m[k] for k in HEADLINE}


def build_ensemble_report(columns: dict[str, dict[str, np.ndarray]], y: dict[str, np.ndarray],
                          keys: dict[str, list[Key]], labels: Sequence[str], out_dir: str | Path, *,
                          seeds: Sequence[str], members: Sequence[str], selected: dict | None = None,
                          wall_s: dict | None = None, extra: dict | None = None, n_boot: int = N_BOOT,
                          boot_seed: int = SEED) -> dict:
    """Score every column on dev and test, bootstrap the ensemble's gains on test, write the evidence.

    Args:
        columns: ``{split: {name: probs [N, C]}}`` for ``dev`` and ``test``, same names in both.
        y: ``{split: gold indices [N]}`` (scoring only).
        keys: ``{split: [(dialogue_id, turn)] * N}``, the rows' order.
        labels: label order (``C``).
        out_dir: receives ``test_predictions.parquet``, ``dev_predictions.parquet``, ``report.json``,
            ``report.md`` and ``ablation.png``.
        seeds: the vanilla seed columns (``vanilla_seed<k>``).
        members: the LLM members (their columns alone; ``fused_<m>`` when fused).
        selected: the fusion settings chosen on dev, per fused row.
        wall_s: wall-clock seconds of the caller's steps.
        extra: more fields for ``report.json`` (folds, coverage, inputs).
        n_boot: bootstrap resamples.
        boot_seed: bootstrap seed.

    Returns:
        The report (also written to ``report.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(columns["test"])
    check_names(names, seeds)
    if list(columns["dev"]) != names:
        raise ValueError(f"dev columns {list(columns['dev'])} differ from test columns {names}")
    report: dict = {"labels": list(labels), "seeds": list(seeds), "members": list(members), "rows": names}
    for split in ("test", "dev"):
        write_predictions(out / f"{split}_predictions.parquet", keys[split], columns[split], labels, split)
        report[split] = {n: score(y[split], p, labels) for n, p in columns[split].items()}
    # the single-seed baseline: each seed scored alone, then averaged (not the seed-average distribution)
    report["vanilla_seed_mean"] = {split: {k: float(np.mean([report[split][s][k] for s in seeds])) for k in HEADLINE}
                                   for split in ("test", "dev")}
    test = columns["test"]
    report.update(ensemble_gains(y["test"], test["ensemble"], [test[s] for s in seeds], test["vanilla_avg"],
                                 [k[0] for k in keys["test"]], len(labels), n_boot, boot_seed))
    report.update({"selected": selected or {}, "wall_s": wall_s or {}, "gold_past_labels_used": False,
                   "n_utterances": {s: len(keys[s]) for s in keys},
                   "n_dialogues": {s: len({k[0] for k in keys[s]}) for s in keys}, "notes": NOTES, **(extra or {})})
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "ablation.png")
    return report


def _kind(name: str, seeds: Sequence[str]) -> str:
    if name in seeds:
        return "vanilla seed"
    if name == "vanilla_avg":
        return "vanilla seed average"
    if name == "ensemble":
        return "fused, all members"
    if name.startswith("fused_"):
        return "fused, vanilla_avg + " + name[len("fused_"):]
    return "LLM member alone"


def markdown(r: dict) -> str:
    """``report.md``: the ablation table, the CIs and the selected settings."""
    lines = ["# Ensemble on MELD", "",
             f"Test: {r['n_utterances']['test']} utterances in {r['n_dialogues']['test']} dialogues; "
             f"dev: {r['n_utterances']['dev']} in {r['n_dialogues']['dev']} (fitting only). Percent.", "",
             "| row | kind | test wF1 | test acc | test macro F1 | dev wF1 |", "|---|---|---|---|---|---|"]
    for n in r["rows"]:
        t, d = r["test"][n], r["dev"][n]
        lines.append(f"| {n} | {_kind(n, r['seeds'])} | {t['weighted_f1']:.2f} | {t['accuracy']:.2f} | "
                     f"{t['macro_f1']:.2f} | {d['weighted_f1']:.2f} |")
    t, d = r["vanilla_seed_mean"]["test"], r["vanilla_seed_mean"]["dev"]
    lines.append(f"| vanilla_seed_mean | mean of the single seeds | {t['weighted_f1']:.2f} | {t['accuracy']:.2f} | "
                 f"{t['macro_f1']:.2f} | {d['weighted_f1']:.2f} |")
    lines += ["", "Ensemble gain in test weighted F1 (paired bootstrap over dialogues):", ""]
    for key, what in (("gain_vs_vanilla_mean", "mean of the single vanilla seeds"),
                      ("gain_vs_vanilla_seed_avg", "the vanilla seed average")):
        g = r[key]
        lines.append(f"- vs {what}: {g['point']:+.2f} pp, 95% CI [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}] "
                     f"({g['n_boot']} resamples, seed {g['seed']})")
    if r.get("lantern_coverage"):
        cov = ", ".join(f"{s} {100 * v:.1f}%" for s, v in r["lantern_coverage"].items())
        lines += ["", f"Utterances with at least one Lantern candidate: {cov} (the rest fall back to vanilla_avg)."]
    if r.get("selected"):
        lines += ["", "| fused row | selected on dev | held-out dev wF1 |", "|---|---|---|"]
        for n, s in r["selected"].items():
            lines.append(f"| {n} | {s['selected']} | {s['dev_heldout'][s['selected']]:.2f} |")
    lines += ["", *[f"- {note}" for note in r["notes"]]]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Horizontal bars of test weighted F1 per row; a line at the mean of the single vanilla seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = r["rows"][::-1]  # first row on top
    vals = [r["test"][n]["weighted_f1"] for n in names]
    colors = ["tab:gray" if n.startswith("vanilla") else "tab:red" if n == "ensemble"
              else "tab:blue" if n.startswith("fused_") else "tab:green" for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.38 * len(names) + 1.4))
    ax.barh(np.arange(len(names)), vals, color=colors)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    mean = r["vanilla_seed_mean"]["test"]["weighted_f1"]
    ax.axvline(mean, color="black", ls="--", lw=1, label=f"single-seed vanilla mean {mean:.2f}")
    ax.set_yticks(np.arange(len(names)), names)
    lo = min(vals + [mean])
    ax.set_xlim(max(0.0, lo - 5), max(vals + [mean]) + 3)
    ax.set_xlabel("test weighted F1 (%)")
    g = r["gain_vs_vanilla_mean"]
    ax.set_title(f"ensemble ablation (gain vs seed mean {g['point']:+.2f}, 95% CI [{g['ci95'][0]:+.2f}, {g['ci95'][1]:+.2f}])",
                 fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5 / len(names) - 0.08), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
