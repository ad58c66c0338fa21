"""Reading dev/test distributions from an ``mer ensemble`` run and from a plain models dir with a Lantern
fusion (cross-fitted here), the test report, and rewriting an evidence dir as calibrated."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from mer_ray.calibration.apply import calibrate_evidence
from mer_ray.calibration.calibrate import fit_sources
from mer_ray.calibration.measure import measure, plot_reliability
from mer_ray.calibration.sources import ensemble_sources, load_sources
from mer_ray.data.labels import get_label_set
from tests.unit.calibration.synth import draw, softmax

MELD7 = list(get_label_set("meld7").labels)
#: ablation row -> how over-confident its synthetic distribution is (the temperature calibration should find)
ROWS = {"vanilla_seed0": 1.0, "vanilla_avg": 1.6, "lantern": 0.7, "farcer": 2.5, "ensemble": 1.3}


def _run(root, n_dev=1_500, n_test=2_000):
    """A fake ensemble run dir: report.json + {dev,test}_predictions.parquet (MELD labels), and its gold."""
    from mer_ray.ensemble.evidence import write_predictions

    rep = root / "report"
    rep.mkdir(parents=True)
    gold = {}
    for s, n, seed in (("dev", n_dev, 0), ("test", n_test, 1)):
        z, y, _ = draw(n, t=1.0, seed=seed, scale=2.0)
        keys = [(f"{s}/{i // 6}", i % 6) for i in range(n)]
        cols = {row: softmax(z * t) for row, t in ROWS.items()}  # z * t: over-confident by t (under- if t < 1)
        write_predictions(rep / f"{s}_predictions.parquet", keys, cols, MELD7, s)
        gold[s] = {k: MELD7[j] for k, j in zip(keys, y)}
    metrics = {"weighted_f1": 0.0, "accuracy": 0.0, "macro_f1": 0.0}
    report = {"labels": MELD7, "rows": list(ROWS), "members": ["lantern", "farcer"], "folds": 5, "fold_seed": 0,
              "test": {r: metrics for r in ROWS}, "dev": {r: metrics for r in ROWS}}
    (rep / "report.json").write_text(json.dumps(report))
    return root, gold


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("ens"))


def test_ensemble_run_names_and_temperatures(run):
    root, gold = run
    src = load_sources(root, gold=gold)
    assert set(src.dev.probs) == {"final_llm", "final_no_llm", "vanilla", "llm", "farcer"}
    assert src.columns["final_llm"] == "probs_ensemble" and src.columns["vanilla"] == "probs_vanilla_avg"
    assert src.provenance["distributions"]["final_llm"]["out_of_fold"] is True
    cal = fit_sources(src)
    for name, row in (("final_llm", "ensemble"), ("final_no_llm", "vanilla_avg"), ("llm", "lantern"), ("farcer", "farcer")):
        assert cal.temperatures[name] == pytest.approx(ROWS[row], rel=0.1), name
    assert set(cal.conformal) == {"final_llm", "final_no_llm"}
    assert set(cal.conformal["final_llm"]) == {"meld7", "meld_sentiment3", "emorynlp7", "iemocap4"}


def test_measure_reports_every_distribution_and_the_sets(run, tmp_path):
    root, gold = run
    src = load_sources(root, gold=gold)
    cal = fit_sources(src)
    rep = measure(cal, src)
    for name, m in rep["test"].items():
        assert m["argmax_changed"] == 0
        assert m["ece_after"] < 0.03 and m["nll_after"] <= m["nll_before"] + 1e-9, name
    assert rep["test"]["farcer"]["ece_before"] > 0.1
    c = rep["conformal"]
    assert c["method"] == "class_conditional_lac" and c["alpha"] == 0.1 and c["empty_sets"] == 0
    assert c["argmax_always_in_set"] and set(c["coverage_per_class"]) <= set(MELD7)
    assert abs(c["coverage"] - 0.9) < 0.03 and abs(c["lac"]["coverage"] - 0.9) < 0.03
    assert c["topk_baseline"]["chosen_on"] == "dev" and c["topk_baseline"]["dev_coverage"] >= 0.9
    assert set(c["label_sets"]) == {"meld_sentiment3", "emorynlp7", "iemocap4"}
    assert rep["conformal_no_llm"]["method"] == "class_conditional_lac"
    assert set(rep["goals"]) == {"served_test_ece_le_0.05", "conformal_coverage_within_0.02", "conformal_no_llm_coverage_within_0.02"}
    png = plot_reliability(cal, src, tmp_path / "r.png")
    assert png.stat().st_size > 1000


def test_calibrate_evidence_rewrites_a_copy_keeping_the_uncalibrated_columns(run, tmp_path):
    root, gold = run
    ev = tmp_path / "evidence"
    shutil.copytree(root / "report", ev)
    (ev / "report.md").write_text("# Ensemble on MELD\n")
    src = ensemble_sources(root, gold=gold)
    cal = fit_sources(src)
    block = calibrate_evidence(ev, cal, gold)
    assert set(block["temperatures"]) == {"ensemble", "vanilla_avg", "lantern", "farcer"}
    t, orig = pq.read_table(ev / "test_predictions.parquet"), pq.read_table(root / "report" / "test_predictions.parquet")
    assert "uncalibrated_probs_vanilla_seed0" not in t.column_names  # no temperature: left alone
    # the evidence contract: every probs_* column is a scored row, and only the seeds and their average start probs_vanilla
    assert {c for c in t.column_names if c.startswith("probs_vanilla")} == {c for c in orig.column_names if c.startswith("probs_vanilla")}
    assert not [c for c in t.column_names if c.startswith("probs_") and c.endswith("uncalibrated")]
    assert t["probs_vanilla_seed0"].equals(orig["probs_vanilla_seed0"])
    raw = np.asarray(orig["probs_ensemble"].to_pylist())
    np.testing.assert_allclose(np.asarray(t["uncalibrated_probs_ensemble"].to_pylist()), raw)
    np.testing.assert_allclose(np.asarray(t["probs_ensemble"].to_pylist()), cal.calibrate("final_llm", raw), atol=1e-6)
    rep = json.loads((ev / "report.json").read_text())
    assert rep["calibration"]["test"]["ensemble"]["ece_after"] < rep["calibration"]["test"]["ensemble"]["ece_before"]
    assert rep["test"]["ensemble"]["accuracy"] > 0  # recomputed from the (same-argmax) calibrated rows
    assert "## Calibration" in (ev / "report.md").read_text()
    # a second rewrite starts from the uncalibrated copies: nothing is calibrated twice
    calibrate_evidence(ev, cal, gold)
    t2 = pq.read_table(ev / "test_predictions.parquet")
    assert t2.column_names == t.column_names and t2["probs_ensemble"].equals(t["probs_ensemble"])
    assert (ev / "report.md").read_text().count("## Calibration") == 1
    # and the run's own files are untouched
    assert "uncalibrated_probs_ensemble" not in pq.read_table(root / "report" / "test_predictions.parquet").column_names
    # a run whose report was rewritten is read from its uncalibrated copies: refitting gives the same temperatures
    shutil.copytree(ev, tmp_path / "rewritten" / "report")
    again = ensemble_sources(tmp_path / "rewritten", gold=gold)
    np.testing.assert_allclose(again.test.probs["final_llm"], raw, atol=1e-7)
    assert fit_sources(again).temperatures == pytest.approx(cal.temperatures)


def test_plain_models_dir_with_a_lantern_fusion_is_cross_fitted_as_mer_lantern_fuse_selected_it(tmp_path):
    from mer_ray.lantern import fit as F
    from mer_ray.lantern.artifacts import write_fusion
    from mer_ray.lantern.job import load_llm_outputs
    from tests.unit.ensemble import synth

    g = synth.gold(n_dialogues=40, seed=0)
    rng = np.random.default_rng(0)
    preds = {s: synth.write_member(tmp_path / "predictions" / f"predictions_{s}.parquet",
                                   synth.distributions(g[s], 0.5, rng), s) for s in ("dev", "test")}
    prompts = synth.write_lantern(tmp_path / "lantern" / "prompts", g, 0.7, tmp_path / "predictions")
    llm = load_llm_outputs(prompts)
    dev = F.assemble(pq.read_table(preds["dev"]), llm, gold=g["dev"], labels=synth.LABELS)
    setting = {"calibrated": False, "weight_decay": 1e-2, "steps": 40, "hidden": 16}
    model = F.fit(dev, seed=0, **{k: v for k, v in setting.items() if k != "calibrated"})
    models = tmp_path / "models"
    write_fusion(models / "fusion", {"labels": synth.LABELS, "mode": "fusion", "selected": "s", "setting": setting,
                                     "calibrated": False, "content_free": None, "folds": 3, "seed": 0}, model.state_dict())
    src = load_sources(models, gold=g)
    assert src.provenance["kind"] == "models_dir" and src.provenance["distributions"]["final_llm"]["cross_fitted_here"]
    held = F.cross_fit(dev, {"f": {k: v for k, v in setting.items() if k != "calibrated"}}, k=3, seed=0)["f"]
    idx = {k: i for i, k in enumerate(zip(dev.dialogue_id, dev.turn))}
    order = [idx[k] for k in src.dev.keys]
    np.testing.assert_allclose(src.dev.probs["final_llm"], held[order], atol=1e-6)
    test = F.assemble(pq.read_table(preds["test"]), llm, gold=g["test"], labels=synth.LABELS)
    tidx = {k: i for i, k in enumerate(zip(test.dialogue_id, test.turn))}
    np.testing.assert_allclose(src.test.probs["final_llm"], F.predict(model, test)[[tidx[k] for k in src.test.keys]], atol=1e-6)
    cal = fit_sources(src)
    assert cal.label_set == "custom" and set(cal.conformal["final_llm"]) == {"custom"}
    assert {"final_llm", "final_no_llm", "vanilla", "llm"} <= set(cal.temperatures)


def test_pipeline_layout_averages_the_seeds_and_a_failed_fit_removes_a_stale_file(tmp_path):
    """``mer pipeline``'s layout: ``<out>/models`` beside ``<out>/predictions/seed*/``; gold from the loaded table."""
    import pyarrow as pa

    from mer_ray.calibration.artifacts import CALIBRATION_FILE, Calibration
    from mer_ray.calibration.calibrate import fit_dir
    from mer_ray.calibration.sources import gold_from_table
    from tests.unit.ensemble import synth

    g = synth.gold(n_dialogues=40, seed=1)
    rng = np.random.default_rng(1)
    seeds = {}
    for k in (0, 1):
        for s in ("dev", "test"):
            seeds[(k, s)] = synth.write_member(tmp_path / "predictions" / f"seed{k}" / f"predictions_{s}.parquet",
                                               synth.distributions(g[s], 0.5, rng), s)
    table = pa.table({"dialogue_id": [k[0] for s in g for k in g[s]], "turn": [k[1] for s in g for k in g[s]],
                      "label": [lab for s in g for lab in g[s].values()], "split": [s for s in g for _ in g[s]]})
    models = tmp_path / "models"
    models.mkdir()
    cal = fit_dir(models, gold=gold_from_table(table))
    assert Calibration.load(models) == cal and set(cal.temperatures) == {"final_no_llm", "vanilla"}
    assert cal.fitted_on["distributions"]["vanilla"]["how"].endswith("mean of 2 seeds")
    src = load_sources(models, gold=g)
    mean = np.mean([np.asarray(pq.read_table(seeds[(k, "dev")])["emotion_probs"].to_pylist(), dtype=np.float64)
                    for k in (0, 1)], axis=0)
    np.testing.assert_allclose(src.dev.probs["final_no_llm"], mean, atol=1e-6)
    # new models without dev predictions: the old file must go (it calibrated other models)
    shutil.rmtree(tmp_path / "predictions")
    assert fit_dir(models, gold=gold_from_table(table), strict=False) is None
    assert not (models / CALIBRATION_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no dev vanilla predictions"):
        fit_dir(models, gold=gold_from_table(table))


def test_the_recipe_rewrites_its_evidence_copy_with_the_runs_stored_calibration(run, tmp_path):
    from mer_ray.calibration.apply import calibrate_run_evidence

    root, gold = run
    ev = tmp_path / "evidence"
    shutil.copytree(root / "report", ev)
    with pytest.raises(FileNotFoundError, match="calibration.json is missing"):
        calibrate_run_evidence(root, ev, gold=gold)
    cal = fit_sources(ensemble_sources(root, gold=gold))
    cal.save(root)
    calibrate_run_evidence(root, ev, gold=gold)
    raw = np.asarray(pq.read_table(root / "report" / "test_predictions.parquet")["probs_ensemble"].to_pylist())
    got = np.asarray(pq.read_table(ev / "test_predictions.parquet")["probs_ensemble"].to_pylist())
    np.testing.assert_allclose(got, cal.calibrate("final_llm", raw), atol=1e-6)

