"""`mer calibrate`: fit temperatures and conformal scores on dev, store them, report once on test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer()
NOTES = [
    "Temperatures and conformal scores are fitted on dev only; test gold is used once, for scoring.",
    "Dev distributions are out of fold: the fusion's dev rows are cross-fitted over dialogues, the other members "
    "are not fitted on dev (vanilla seeds select their epoch on dev).",
    "Conformal scores use out-of-fold temperatures (each dev row scaled by a T fitted on the other folds); test rows "
    "use the T fitted on all of dev, as served.",
    "ECE: top-label, 15 equal-width bins. NLL: mean negative log-likelihood (natural log).",
    "topk_baseline: the smallest fixed k whose top-k coverage on dev reaches 1 - alpha, scored on test.",
]


@app.command("calibrate")
def calibrate(
    models: Path = typer.Option(..., help="A models dir (mer demo / mer pipeline) or an `mer ensemble` run dir."),
    meld_dir: Path | None = typer.Option(None, help="MELD CSV directory for gold (default: $MER_MELD_DIR)."),
    manifest: Path | None = typer.Option(None, help="Gold from this manifest instead (default for a demo: its corpus)."),
    lantern: Path | None = typer.Option(None, help="The Lantern prompt job's outputs (default: MODELS/../lantern/prompts)."),
    alpha: float = typer.Option(0.1, help="Default miscoverage of the prediction sets (and the one reported)."),
    method: str = typer.Option("class_conditional_lac", help="class_conditional_lac (a threshold per label) or lac (marginal)."),
    folds: int = typer.Option(5, help="Cross-fitting folds over dev dialogues for the out-of-fold conformal scores."),
    seed: int = typer.Option(0, help="Fold seed."),
    out: Path | None = typer.Option(None, help="Write the test report here (docs/bench/calibration.json)."),
    plot: Path | None = typer.Option(None, help="Write the reliability diagram here (docs/bench/calibration/reliability.png)."),
    evidence: Path | None = typer.Option(None, help="Also rewrite this ensemble evidence dir's probs_* as calibrated."),
):
    """(Re)fit calibration on dev and write MODELS/calibration.json; then report ECE/NLL before and after and the
    conformal coverage on test, once (test gold is only scored)."""
    from mer_ray.calibration.calibrate import fit_sources
    from mer_ray.calibration.measure import measure, plot_reliability
    from mer_ray.calibration.sources import load_sources

    src = load_sources(models, meld=meld_dir, manifest=manifest, lantern=lantern)
    cal = fit_sources(src, method=method, alpha=alpha, k=folds, seed=seed)
    path = cal.save(models)
    typer.echo(f"wrote {path}: T = {json.dumps({n: round(t, 4) for n, t in cal.temperatures.items()})}, "
               f"{cal.method}, alpha range {list(cal.alpha_range)}")
    if src.test is None:
        typer.echo("no test split: nothing to report")
        return
    rep = {"command": "mer calibrate " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 and sys.argv[1] == "calibrate" else None,
           "models": str(models), "calibration_file": str(path), "labels": cal.labels, "label_set": cal.label_set,
           "temperatures": cal.temperatures, "alpha_range": list(cal.alpha_range),
           "fitted_on": {k: cal.fitted_on[k] for k in ("split", "n", "n_dialogues", "rows", "kind", "distributions") if k in cal.fitted_on},
           "test_n": len(src.test.y), **measure(cal, src, alpha), "notes": NOTES}
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rep, indent=1) + "\n")
        typer.echo(f"wrote {out}")
    if plot:
        typer.echo(f"wrote {plot_reliability(cal, src, plot)}")
    if evidence:
        from mer_ray.calibration.apply import calibrate_evidence, gold_of

        calibrate_evidence(evidence, cal, gold_of(cal, src), str(path))
        typer.echo(f"rewrote {evidence} with calibrated distributions (uncalibrated copies kept)")
    c = rep["conformal"] or rep["conformal_no_llm"] or {}
    typer.echo(json.dumps({"ece_after": {n: round(m["ece_after"], 4) for n, m in rep["test"].items()},
                           "coverage": c.get("coverage"), "mean_set_size": c.get("mean_set_size"), "goals": rep["goals"]}, indent=1))


@app.command("calibrate-adapter")
def calibrate_adapter_cmd(
    models: Path = typer.Option(..., help="The models directory that holds the adapter (<models>/mllm/adapters/NAME)."),
    name: str = typer.Option(..., help="The adapter."),
    predictions: Path = typer.Option(..., help="Its dev predictions: mer predict llm --model MODELS/mllm/adapters/NAME --split dev --out P."),
    meld_dir: Path | None = typer.Option(None, help="MELD CSV directory for dev gold (default: $MER_MELD_DIR)."),
    manifest: Path | None = typer.Option(None, help="Dev gold from this manifest instead (an adapter trained on another corpus)."),
    alpha: float = typer.Option(0.1, help="Default miscoverage of the adapter's prediction sets."),
    method: str = typer.Option("class_conditional_lac", help="class_conditional_lac (a threshold per label) or lac (marginal)."),
    folds: int = typer.Option(5, help="Cross-fitting folds over dev dialogues for the out-of-fold conformal scores."),
    seed: int = typer.Option(0, help="Fold seed."),
):
    """Fit one adapter's temperature and conformal scores on its dev predictions; write its calibration.json.
    Served adapters then answer calibrated, with prediction sets at the request's alpha (re-read on reload)."""
    from mer_ray.calibration.adapter import calibrate_adapter
    from mer_ray.calibration.sources import gold_from_meld, gold_from_table

    if meld_dir is not None and manifest is not None:
        raise typer.BadParameter("give at most one of --meld-dir and --manifest")
    if manifest is not None:
        from mer_ray.data.loaders import load_manifest

        gold = gold_from_table(load_manifest(manifest), "dev").get("dev", {})
    else:
        gold = gold_from_meld(meld_dir, ("dev",))["dev"]
    cal = calibrate_adapter(models, name, predictions, gold, method=method, alpha=alpha, k=folds, seed=seed)
    typer.echo(f"adapter {name!r}: T = {cal.temperatures['mllm']:.4f}, {cal.method}, alpha range {list(cal.alpha_range)}, "
               f"sets in {sorted(cal.conformal.get('mllm', {}))}; fitted on {cal.fitted_on['n']} dev utterances")
