"""Cross-fitted vanilla references for training Lantern x FARCER (k folds of train; Ray Train per fold).

An LLM that learns to correct the vanilla model must see, on train, references
as good (and as wrong) as the ones it will see on dev and test: predictions
of models that never saw those dialogues. Train dialogues are split into
``k`` folds; a frozen-feature vanilla model is trained on the other ``k-1``
folds (its epoch selected on MELD dev, which it never predicts) and predicts
the held-out fold. The k-fold models predict train only, never dev or test.
Each fold's model and predictions are kept, so a rerun skips finished folds.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.lantern.fit import folds as dialogue_folds


def fold_stores(store: str | Path, out: Path, k: int, seed: int, train_split: str = "train", dev_split: str = "dev") -> list[Path]:
    """Write ``out/fold{f}/store.parquet`` (in-fold train as ``train``, dev as ``dev``, held-out fold as ``heldout``)."""
    from mer_ray.vanilla.train import read_store_split

    train, dev = read_store_split(store, train_split), read_store_split(store, dev_split)
    if train.num_rows == 0 or dev.num_rows == 0:
        raise ValueError(f"feature store {store} needs rows of {train_split!r} and {dev_split!r}")
    parts = dialogue_folds(train.column("dialogue_id").to_pylist(), k, seed)
    paths = []
    for f, held in enumerate(parts):
        path = out / f"fold{f}" / "store.parquet"
        paths.append(path)
        if path.exists():
            continue
        is_held = np.zeros(train.num_rows, dtype=bool)
        is_held[held] = True
        split = pa.array(np.where(is_held, "heldout", "train").tolist())
        t = train.set_column(train.schema.get_field_index("split"), "split", split)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables([t, dev]), path)
    return paths


def crossfit_references(store: str | Path, out: str | Path, train_cfg, k: int = 5, seed: int = 0, parallel: int = 2) -> dict:
    """Train ``k`` fold models and write ``out/train_references.parquet`` (vanilla prediction contract, no gold).

    Call with Ray running (each fold is one Ray Train run of one worker).

    Args:
        store: the feature store (a ``split`` column with train and dev).
        train_cfg: :class:`mer_ray.vanilla.train.TrainConfig` of the fold models (frozen features: about a minute).
        parallel: folds trained at once.

    Returns:
        a summary: ``k``, per-fold dialogues/best epoch/seconds, ``path``, ``seconds``.
    """
    from mer_ray.vanilla.predict import VanillaPredictor, drop_gold
    from mer_ray.vanilla.train import fit, read_store_split

    out = Path(out)
    final = out / "train_references.parquet"
    if final.exists() and (out / "summary.json").exists():
        print(f"[references] {final} exists: skipped", flush=True)
        return json.loads((out / "summary.json").read_text())
    t0 = time.time()
    stores = fold_stores(store, out, k, seed)

    def one(f: int) -> dict:
        model_dir, pred_path = out / f"fold{f}" / "model", out / f"fold{f}" / "heldout.parquet"
        t = time.time()
        if not pred_path.exists():
            res = fit(train_cfg.model_copy(update={"seed": seed}), stores[f], out / "ray_train", f"fold{f}", export_dir=model_dir)
            held = drop_gold(read_store_split(stores[f], "heldout"))  # gold never reaches the model
            pq.write_table(VanillaPredictor.from_dir(model_dir, num_threads=train_cfg.num_threads).predictions_table(held), pred_path)
            print(f"[references] fold {f + 1}/{k}: best epoch {res['best_epoch']}, {held.num_rows} held-out utterances, "
                  f"{time.time() - t:.0f} s", flush=True)
        return {"fold": f, "path": str(pred_path), "seconds": round(time.time() - t, 1)}

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        per_fold = list(pool.map(one, range(k)))
    tables = [pq.read_table(p["path"]) for p in per_fold]
    refs = pa.concat_tables(tables).sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])
    refs = refs.replace_schema_metadata({**(tables[0].schema.metadata or {}), b"crossfit": json.dumps({"k": k, "seed": seed}).encode()})
    train = read_store_split(store, "train")
    want = set(zip(train.column("dialogue_id").to_pylist(), train.column("turn").to_pylist()))
    have = list(zip(refs.column("dialogue_id").to_pylist(), refs.column("turn").to_pylist()))
    if set(have) != want or len(have) != len(want):
        raise RuntimeError(f"cross-fitted references cover {len(set(have))} of {len(want)} train utterances ({len(have)} rows)")
    pq.write_table(refs, final)
    summary = {"k": k, "seed": seed, "path": str(final), "rows": refs.num_rows, "folds": per_fold, "seconds": round(time.time() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
