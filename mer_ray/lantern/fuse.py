"""``mer lantern fuse``: cross-fit on dev, select, refit, evaluate once on test, report.

The report puts vanilla, LLM-only (raw and calibrated) and fused side by side on
test, with an ablation over receptive-field sizes. Gold labels are joined here,
for fitting on dev and scoring; they never reach a prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mer_ray.lantern import fit as F
from mer_ray.lantern.artifacts import write_fusion
from mer_ray.lantern.queries import CF_DIALOGUE, read_vanilla, size_name

SETTINGS = {
    "fusion_raw_wd1e-3": {"calibrated": False, "weight_decay": 1e-3},
    "fusion_raw_wd1e-2": {"calibrated": False, "weight_decay": 1e-2},
    "fusion_cal_wd1e-3": {"calibrated": True, "weight_decay": 1e-3},
    "fusion_cal_wd1e-2": {"calibrated": True, "weight_decay": 1e-2},
    # short fits: small dev sets overfit 300 full-batch steps
    "fusion_raw_short": {"calibrated": False, "weight_decay": 1e-2, "steps": 40},
    "fusion_cal_short": {"calibrated": True, "weight_decay": 1e-2, "steps": 40},
}


def _split(t: pa.Table, split: str, dialogues: set[str]) -> pa.Table:
    t = t.filter(pc.equal(t["split"], split))
    return t.filter(pa.array([d in dialogues for d in t["dialogue_id"].to_pylist()], pa.bool_()))


def _metrics(y: np.ndarray, p: np.ndarray, labels: Sequence[str]) -> dict:
    import warnings

    from mer_ray.eval.metrics import compute_metrics

    warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
    m = compute_metrics([labels[i] for i in y], [labels[i] for i in p.argmax(1)], list(labels))
    return {k: m[k] for k in ("n", "weighted_f1", "accuracy", "macro_f1", "per_class_f1")}


def _data(van, llm, gold, labels, calibrated, sizes=None, stride=1):
    return F.assemble(van, llm, sizes=sizes, stride=stride, calibrated=calibrated, gold=gold, labels=labels)


def _fit_eval(dev_van, test_van, llm, gold, labels, setting, k, seed, sizes=None, stride=1):  # noqa: PLR0913
    hp = {k2: v for k2, v in setting.items() if k2 != "calibrated"}
    dev = _data(dev_van, llm, gold, labels, setting["calibrated"], sizes, stride)
    test = _data(test_van, llm, gold, labels, setting["calibrated"], sizes, stride)
    held = F.cross_fit(dev, {"f": hp}, k=k, seed=seed)["f"]
    model = F.fit(dev, seed=seed, **hp)
    return dev, test, held, model, F.predict(model, test)


def run_fuse(vanilla: str | Path, llm_dirs: Sequence[str | Path], data_dir: str | Path, out: str | Path,
             k: int = 5, seed: int = 0, stride: int | None = None, ablation_sizes: Sequence[int | None] | None = None,
             settings: dict[str, dict] | None = None, gold: dict | None = None) -> dict:
    """Fit fusion on dev by k-fold cross-fitting, pick by held-out weighted F1, report on test.

    ``settings`` maps a name to fusion hyper-parameters (``calibrated``, ``weight_decay``,
    ``steps``, ...); the default grid is :data:`SETTINGS`. ``gold`` (``{(dialogue_id, turn):
    label}``) replaces MELD's gold from ``data_dir`` for other corpora (e.g. the demo's).
    """
    grid = settings or SETTINGS
    from mer_ray.data.loaders import load_meld
    from mer_ray.lantern.job import load_llm_outputs

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    job_path = Path(llm_dirs[0]) / "job.json"
    job = json.loads(job_path.read_text()) if job_path.exists() else {}
    if stride is None:
        stride = job.get("stride", 1)
    van, labels, _ = read_vanilla(vanilla)
    llm = pa.concat_tables([load_llm_outputs(d) for d in llm_dirs], promote_options="default")
    covered = set(llm["dialogue_id"].to_pylist()) - {CF_DIALOGUE}
    gold = dict(gold) if gold is not None else {}
    for split in ("dev", "test") if not gold else ():
        g = load_meld(data_dir, split)
        gold.update(zip(zip(g["dialogue_id"].to_pylist(), g["turn"].to_pylist()), g["label"].to_pylist()))
    dev_van, test_van = _split(van, "dev", covered), _split(van, "test", covered)
    if not dev_van.num_rows or not test_van.num_rows:
        raise ValueError(f"LLM outputs must cover dev and test dialogues; got dev {dev_van.num_rows}, "
                         f"test {test_van.num_rows} utterances")
    sizes_seen = sorted({s for s in llm["field_size"].to_pylist() if s is not None}) + (
        [None] if None in llm["field_size"].to_pylist() else [])
    ablation_sizes = list(ablation_sizes) if ablation_sizes is not None else sizes_seen

    # 1. cross-fit every setting on dev; select (vanilla among the candidates)
    dev_raw = _data(dev_van, llm, gold, labels, False)
    dev_cal = _data(dev_van, llm, gold, labels, True)
    held = {"vanilla": dev_raw.vanilla.numpy()}
    for name, st in grid.items():
        hp = {k2: v for k2, v in st.items() if k2 != "calibrated"}
        held[name] = F.cross_fit(dev_cal if st["calibrated"] else dev_raw, {name: hp}, k=k, seed=seed)[name]
    chosen, dev_metrics = F.select(held, dev_raw.y.numpy(), labels)
    dev_llm = {"llm_only": _metrics(dev_raw.y.numpy(), dev_raw.llm_only(), labels),
               "llm_only_calibrated": _metrics(dev_raw.y.numpy(), dev_cal.llm_only(), labels)}
    best_fusion = max(grid, key=lambda n: dev_metrics[n]["weighted_f1"])

    # 2. refit on all of dev, evaluate once on test
    test_raw = _data(test_van, llm, gold, labels, False)
    test_cal = _data(test_van, llm, gold, labels, True)
    y = test_raw.y.numpy()
    rows = {"vanilla": _metrics(y, test_raw.vanilla.numpy(), labels),
            "llm_only": _metrics(y, test_raw.llm_only(), labels),
            "llm_only_calibrated": _metrics(y, test_cal.llm_only(), labels)}
    fitted = {}
    for name in {chosen, best_fusion} - {"vanilla"}:
        st = grid[name]
        hp = {k2: v for k2, v in st.items() if k2 != "calibrated"}
        model = F.fit(dev_cal if st["calibrated"] else dev_raw, seed=seed, **hp)
        fitted[name] = model
        rows[f"fused[{name}]"] = _metrics(y, F.predict(model, test_cal if st["calibrated"] else test_raw), labels)
    rows["fused (selected)"] = rows["vanilla"] if chosen == "vanilla" else rows[f"fused[{chosen}]"]

    # 3. ablation over receptive-field sizes, with the best fusion setting
    ablation = {}
    subsets = [[s] for s in ablation_sizes] + ([ablation_sizes] if len(ablation_sizes) > 1 else [])
    st = grid[best_fusion]
    for sub in subsets:
        key = "+".join(size_name(s) for s in sub)
        dev_d, test_d, held_s, _, pred = _fit_eval(dev_van, test_van, llm, gold, labels, st, k, seed, sub, stride)
        ablation[key] = {"dev_heldout_fused": _metrics(dev_d.y.numpy(), held_s, labels)["weighted_f1"],
                         "test_fused": _metrics(y, pred, labels)["weighted_f1"],
                         "test_llm_only": _metrics(y, test_d.llm_only(), labels)["weighted_f1"]}

    # 4. save the fusion artifacts (<models>/fusion/) and the report
    fdir = out / "fusion"
    fdir.mkdir(exist_ok=True)
    cf = F.content_free_probs(llm)
    meta = {"labels": list(labels), "mode": "vanilla" if chosen == "vanilla" else "fusion", "selected": chosen,
            "setting": {**grid.get(chosen, {}), "hidden": 16}, "calibrated": grid.get(chosen, {}).get("calibrated", False),
            "content_free": None if cf is None else cf.tolist(), "folds": k, "seed": seed,
            "sizes": [size_name(s) for s in sizes_seen], "stride": stride, "template": job.get("template"),
            # the LLM the fusion was fitted on: serving must prompt the same one
            "backend": {k2: v for k2, v in (job.get("backend") or {}).items() if k2 in ("kind", "model")} or None}
    write_fusion(fdir, meta, None if chosen == "vanilla" else fitted[chosen].state_dict())
    report = {"selected": chosen, "best_fusion_setting": best_fusion,
              "dev_heldout": {n: {k2: m[k2] for k2 in ("weighted_f1", "accuracy", "macro_f1")} for n, m in dev_metrics.items()},
              "dev_llm_only": {n: {k2: m[k2] for k2 in ("weighted_f1", "accuracy", "macro_f1")} for n, m in dev_llm.items()},
              "test": rows, "ablation_sizes": ablation,
              "n_dialogues": {"dev": len(set(dev_raw.dialogue_id)), "test": len(set(test_raw.dialogue_id))},
              "content_free": meta["content_free"], "folds": k, "seed": seed, "stride": stride}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")
    return report


def markdown(r: dict) -> str:
    lines = ["# Lantern fusion report", "",
             f"Dialogues: dev {r['n_dialogues']['dev']} (fitting, {r['folds']}-fold cross-fitting), "
             f"test {r['n_dialogues']['test']}. Selected on dev held-out folds: **{r['selected']}**.", "",
             "| test | weighted F1 | accuracy | macro F1 |", "|---|---|---|---|"]
    for n, m in r["test"].items():
        lines.append(f"| {n} | {m['weighted_f1']:.2f} | {m['accuracy']:.2f} | {m['macro_f1']:.2f} |")
    lines += ["", "| dev held-out | weighted F1 |", "|---|---|"]
    lines += [f"| {n} | {m['weighted_f1']:.2f} |" for n, m in r["dev_heldout"].items()]
    lines += [f"| {n} (no fitting) | {m['weighted_f1']:.2f} |" for n, m in r.get("dev_llm_only", {}).items()]
    lines += ["", f"Ablation over receptive-field sizes ({r['best_fusion_setting']}), weighted F1:", "",
              "| sizes | dev held-out fused | test fused | test LLM-only |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['dev_heldout_fused']:.2f} | {v['test_fused']:.2f} | {v['test_llm_only']:.2f} |"
              for k, v in r["ablation_sizes"].items()]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Left: weighted F1, accuracy and macro F1 per row of the test table. Right: per-class test F1
    of vanilla, the LLM alone (calibrated) and the selected fusion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r["test"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.2]})
    y = np.arange(len(names))
    for i, (k, lab) in enumerate((("weighted_f1", "weighted F1"), ("accuracy", "accuracy"), ("macro_f1", "macro F1"))):
        ax.barh(y + (i - 1) * 0.27, [r["test"][n][k] for n in names], height=0.27, label=lab)
    ax.set_yticks(y, names)
    ax.set_xlabel("test (%)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)
    ax.set_title("vanilla vs LLM-only vs fused (test)")
    show = [n for n in ("vanilla", "llm_only_calibrated", "fused (selected)") if n in r["test"]]
    classes = list(r["test"][show[0]]["per_class_f1"])
    x = np.arange(len(classes))
    for i, n in enumerate(show):
        bx.bar(x + (i - 1) * 0.27, [r["test"][n]["per_class_f1"][c] for c in classes], width=0.27, label=n)
    bx.set_xticks(x, classes, rotation=30)
    bx.set_ylabel("test F1 (%)")
    bx.legend(fontsize=8)
    bx.set_title("per-class F1 (test)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
