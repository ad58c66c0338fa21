"""``mer bench serve-check``: the served ensemble answers what was measured.

``mer serve --models RUN`` (an ``mer ensemble`` run) is started on a local Ray (or ``--url`` names one
already up); ``n`` test dialogues are posted to ``/v1/recognize`` with and without the LLM, and each
answer is compared with the measured predictions file (``test_predictions.parquet`` of the run's
evidence: ``probs_ensemble`` and ``probs_vanilla_avg`` per utterance). The JSON holds the largest
``|delta probs|`` per dialogue and overall; the goal is ``<= 1e-4``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

GOAL = 1e-4
#: Fractional CPUs, one replica each: the whole ensemble fits a small machine.
DEFAULT_CONFIG = "serve/ensemble.yaml"
#: The measured column each request mode is compared with.
COLUMNS = {True: "probs_ensemble", False: "probs_vanilla_avg"}


def measured(predictions: str | Path) -> tuple[dict[str, list[tuple[int, dict[str, np.ndarray]]]], list[str]]:
    """``{dialogue_id: [(turn, {column: probs [C]})] turn-sorted}`` and the file's label order."""
    t = pq.read_table(predictions)
    labels = json.loads(t.schema.metadata[b"emotion_labels"])
    cols = [c for c in COLUMNS.values() if c in t.column_names]
    if COLUMNS[True] not in cols:
        raise ValueError(f"{predictions} has no {COLUMNS[True]} column (is it an ensemble run's test_predictions.parquet?)")
    out: dict[str, list] = {}
    for r in t.select(["dialogue_id", "turn", *cols]).to_pylist():
        out.setdefault(r["dialogue_id"], []).append((int(r["turn"]), {c: np.asarray(r[c], np.float64) for c in cols}))
    return {d: sorted(rows, key=lambda x: x[0]) for d, rows in out.items()}, labels


def meld_dialogues(meld_dir: str | Path, split: str = "test") -> dict[str, list[dict]]:
    """MELD ``split``'s dialogues: ``{dialogue_id: [{"turn", "speaker", "text"}] turn-sorted}`` (no gold)."""
    from mer_ray.data.loaders import load_meld

    out: dict[str, list[dict]] = {}
    for r in load_meld(meld_dir, split).select(["dialogue_id", "turn", "speaker", "text"]).to_pylist():
        out.setdefault(r["dialogue_id"], []).append(r)
    return {d: sorted(rows, key=lambda r: r["turn"]) for d, rows in out.items()}


def pick(measured_ids, texts: dict[str, list[dict]], n: int) -> list[str]:
    """``n`` dialogue ids present in both, spread evenly over the sorted ids (deterministic)."""
    both = sorted(set(measured_ids) & set(texts))
    if not both:
        raise ValueError("no dialogue of the predictions file is in the MELD split (wrong --meld-dir or split?)")
    idx = np.unique(np.linspace(0, len(both) - 1, min(n, len(both))).round().astype(int))
    return [both[i] for i in idx]


def post(url: str, rows: list[dict], use_llm: bool, labels: list[str], timeout_s: float = 600.0) -> np.ndarray:
    """The served probabilities ``[n, C]`` in ``labels`` order for one dialogue."""
    import httpx

    body = {"utterances": [{"speaker": r["speaker"] or "", "text": r["text"] or ""} for r in rows], "use_llm": use_llm}
    r = httpx.post(f"{url.rstrip('/')}/v1/recognize", json=body, timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"{url}/v1/recognize answered {r.status_code}: {r.text[:500]}")
    out = r.json()
    if sorted(out["labels"]) != sorted(labels):
        raise ValueError(f"the service answers labels {out['labels']}, the predictions file has {labels}")
    return np.array([[u["probs"][lab] for lab in labels] for u in out["utterances"]])


def compare(url: str, truth: dict, texts: dict[str, list[dict]], labels: list[str], ids: list[str]) -> dict:
    """Post every dialogue of ``ids`` in both modes; the per-dialogue and overall largest ``|delta|``."""
    per = []
    for d in ids:
        rows, want = texts[d], truth[d]
        if [r["turn"] for r in rows] != [t for t, _ in want]:
            raise ValueError(f"{d}: the MELD turns differ from the predictions file's")
        rec: dict = {"dialogue_id": d, "n_utterances": len(rows)}
        for use_llm, col in COLUMNS.items():
            if col not in want[0][1]:
                continue
            t0 = time.perf_counter()
            got = post(url, rows, use_llm, labels)
            rec[f"latency_s_{col[6:]}"] = round(time.perf_counter() - t0, 3)
            rec[f"max_abs_diff_{col[6:]}"] = float(np.abs(got - np.stack([p[col] for _, p in want])).max())
        per.append(rec)
    keys = [k for k in per[0] if k.startswith("max_abs_diff_")]
    overall = {k[len("max_abs_diff_"):]: max(r[k] for r in per) for k in keys}
    return {"dialogues": per, "max_abs_diff": overall, "goal": GOAL, "pass": all(v <= GOAL for v in overall.values())}


def run_check(models: str, predictions: str | Path, meld_dir: str | Path, n: int = 20, out: str | Path | None = None,
              config: str | None = None, port: int = 8012, url: str | None = None, num_cpus: float | None = None,
              split: str = "test", overrides: list[str] | None = None) -> dict:
    """Start ``mer serve`` on ``models`` (unless ``url``), compare ``n`` dialogues, write ``out``; the result."""
    from mer_ray.serve.ensemble_run import is_ensemble_run

    if url is None and not is_ensemble_run(models):
        raise ValueError(f"{models} is not an `mer ensemble` run directory (no report/fusion/ensemble_fusion.json)")
    truth, labels = measured(predictions)
    texts = meld_dialogues(meld_dir, split)
    ids = pick(truth, texts, n)
    started = url is None
    if started:
        from mer_ray.serve.deploy import serve_local

        url = serve_local(config or DEFAULT_CONFIG, models, port=port, num_cpus=num_cpus, overrides=overrides)
    try:
        res = compare(url, truth, texts, labels, ids)
    finally:
        if started:
            import ray
            from ray import serve

            serve.shutdown()
            ray.shutdown()
    res = {"models": str(models), "predictions": str(predictions), "meld_dir": str(meld_dir), "split": split,
           "config": str(config or DEFAULT_CONFIG) if started else None, "url": url, "overrides": list(overrides or []),
           "labels": labels, "n_dialogues": len(ids), **res}
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    return res
