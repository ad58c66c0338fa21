"""The Ray Data extraction pipeline: manifest rows in, a Parquet feature store out.

Layout: the manifest is cut into *units* of ``batch_rows`` rows (one Ray block
each; every stage maps whole blocks, so a row's batch-mates never depend on
which shards were pending) and *shards* of ``shard_size`` rows (one Parquet
file each, the unit of resume). Each stage is a separate ``map_batches`` with
its own ``ActorPoolStrategy`` and resources from :class:`ExtractConfig`. The
driver collects finished blocks, and writes a shard atomically (temp file, then
rename) as soon as all its rows are in. A re-run skips shards already on disk.
State files start with ``_`` or ``.`` so ``pyarrow.dataset`` ignores them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mer_ray.config import load
from mer_ray.features.columns import FER_LABELS, INTERNAL, OUTPUT, finalize, to_table
from mer_ray.features.config import ExtractConfig
from mer_ray.features.stages import ArrowStage, FusedStage, build_stages, fuse_stages
from mer_ray.reruns import ACTOR_FT, fetch_blocks, retriable_errors, run_with_reruns

log = logging.getLogger(__name__)
STATE = "_extract_state.json"
SUMMARY = "_summary.json"


class ExtractError(RuntimeError):
    """The run itself cannot complete (bad manifest, an output directory of another run, ...)."""


def _load_manifest(manifest: str | Path | pa.Table) -> pa.Table:
    if isinstance(manifest, pa.Table):
        return manifest
    from mer_ray.data.loaders import load_manifest

    return load_manifest(manifest)


def _fingerprint(table: pa.Table, cfg: ExtractConfig, media_root: str | None) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    h = hashlib.sha256(sink.getvalue().to_pybytes())
    h.update(cfg.sha256().encode())
    h.update(str(media_root).encode())
    return h.hexdigest()


def media_plan(manifest, table: pa.Table, media_root, cfg: ExtractConfig) -> tuple[str | None, ExtractConfig]:
    """The resolved media root, and the config with ``media`` off when media cannot be resolved.

    Without a media root, paths resolve under the manifest file's directory; an in-memory table
    has no such directory, so its media columns are ignored (text only), with a warning.
    """
    if media_root is None and isinstance(manifest, (str, Path)):
        media_root = Path(manifest).parent
    root = str(Path(media_root).resolve()) if media_root is not None else None
    if root is None and cfg.media and _has_media(table):
        log.warning("no media root given for an in-memory manifest: video/audio columns ignored (text features only)")
        cfg = cfg.model_copy(update={"media": False})
    return root, cfg


def shard_path(out: Path, shard: int) -> Path:
    return out / f"part-{shard:05d}.parquet"


def _has_media(table: pa.Table) -> bool:
    for col in ("video", "audio"):
        if col in table.column_names and table.column(col).null_count < table.num_rows:
            return True
    return False


def assemble(tables: list[pa.Table], manifest_cols: list[str], metadata: dict) -> pa.Table:
    """Stage outputs -> feature-store rows: sorted, ``status``/``error`` set, every output column present."""
    t = pa.concat_tables(tables, promote_options="default")
    t = t.sort_by("_row")
    status = finalize({"_row": t.column("_row").to_pylist(),
                       "_problems": t.column("_problems").to_pylist() if "_problems" in t.column_names else None,
                       "_fatal": t.column("_fatal").to_pylist() if "_fatal" in t.column_names else None})
    t = to_table(status, base=t)
    n = t.num_rows
    for name, typ in OUTPUT.items():  # every shard has every column: nulls where a stage did not run
        if name not in t.column_names:
            t = t.append_column(name, pa.nulls(n, type=typ))
    t = t.select(manifest_cols + list(OUTPUT))
    return t.replace_schema_metadata({k: json.dumps(v) for k, v in metadata.items()})


def _write_shard(out: Path, shard: int, tables: list[pa.Table], manifest_cols: list[str], metadata: dict) -> None:
    t = assemble(tables, manifest_cols, metadata)
    tmp = out / f".part-{shard:05d}.parquet.tmp"
    pq.write_table(t, tmp)
    os.replace(tmp, shard_path(out, shard))


def _fit_resources(stages: list, cluster_cpus: float) -> float:
    """Scale fractional CPUs down so every fixed-size pool fits on the cluster; returns the factor."""
    want = sum(s.resources.num_cpus * s.resources.pool_size for s in stages)
    if want <= cluster_cpus:
        return 1.0
    factor = cluster_cpus / want * 0.98
    log.warning("stages ask for %.2f CPUs, the cluster has %.1f: scaling each stage's num_cpus by %.2f", want, cluster_cpus, factor)
    return factor


def run_extract(manifest, out_dir, media_root=None, config=None, progress: bool = True) -> dict:
    """Extract features for every manifest row into the Parquet feature store ``out_dir``.

    Args:
        manifest: a manifest path (CSV, JSONL, Parquet) or a ``pa.Table`` in the utterance schema.
        out_dir: output directory; re-running with the same inputs resumes.
        media_root: directory that every ``video``/``audio`` path resolves under. Default: the
            manifest file's directory; for a ``pa.Table`` without a media root the media columns
            are ignored (text features only, with a warning).
        config: an :class:`ExtractConfig`, a dict, a YAML/JSON path, or None for defaults.
        progress: show a progress bar of utterances done.

    Returns:
        The summary dict (also written to ``out_dir/_summary.json``).
    """
    import ray

    t0 = time.time()
    cfg = load(ExtractConfig, config)
    table = _load_manifest(manifest)
    for col in ("dialogue_id", "turn", "text"):
        if col not in table.column_names:
            raise ExtractError(f"manifest lacks the required column {col!r}")
    clash = [c for c in table.column_names if c in OUTPUT or c in INTERNAL or c.startswith("_sec_")]
    if clash:
        raise ExtractError(f"manifest columns {clash} clash with feature-store columns; drop them first")
    root, cfg = media_plan(manifest, table, media_root, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(table, cfg, root)
    n = table.num_rows
    n_shards = max(1, -(-n // cfg.shard_size))
    state_file = out / STATE
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != fp:
            raise ExtractError(f"{out} holds features of a different manifest, media root or config; use another --out")
    elif any(out.glob("part-*.parquet")):
        raise ExtractError(f"{out} already holds Parquet files not written by this extraction; use another --out")
    state_file.write_text(json.dumps({"fingerprint": fp, "rows": n, "shards": n_shards, "shard_size": cfg.shard_size}))
    for tmp in out.glob(".part-*.tmp"):
        tmp.unlink()
    pending = [s for s in range(n_shards) if not shard_path(out, s).exists()]
    skipped = n_shards - len(pending)
    has_media = cfg.media and _has_media(table)
    run: dict = {"stage_seconds": {}, "retried": {}}
    metadata = {"face_labels": list(FER_LABELS), "extract_config": cfg.model_dump(), "media_root": root}
    if pending and not n:  # an empty manifest still gives a readable, typed (empty) store
        _write_shard(out, 0, [table.append_column("_row", pa.array([], pa.int64()))], table.column_names, metadata)
    elif pending:
        if not ray.is_initialized():
            raise ExtractError("run_extract needs a running Ray: start one first (mer_ray.runtime.start_ray)")
        run = _run_ray(table, out, pending, cfg, root, has_media, metadata, progress)
    summary = summarize(out)
    summary.update(stage_seconds=run["stage_seconds"], retried=run["retried"],
                   shards=n_shards, shards_skipped=skipped, seconds=round(time.time() - t0, 2), out_dir=str(out))
    (out / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def _run_ray(table, out, pending, cfg, root, has_media, metadata, progress) -> dict:
    """Cut the pending shards into units and run the stages on Ray; returns :func:`_execute`'s dict."""
    import pyarrow.compute as pc
    import ray

    n = table.num_rows
    manifest_cols = list(table.column_names)
    table = table.append_column("_row", pa.array(range(n), pa.int64()))
    table = table.append_column("_shard", pc.divide(table.column("_row"), cfg.shard_size))
    unit = cfg.batch_rows if has_media else cfg.text_batch_rows
    stages = build_stages(cfg, root, has_media)
    if cfg.fuse and len(stages) > 1 and not any(s.resources.num_gpus for s in stages):
        stages = [fuse_stages(stages, cfg.fused)]
    ctx = ray.data.DataContext.get_current()
    saved, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # our bar counts utterances instead
    stage_seconds: Counter = Counter()
    retried = {"attempts": 0, "errors": [], "rows_redone": 0, "rows_discarded": 0, "attempt_started_at": []}
    try:
        def run_left(attempt: int) -> None:
            nonlocal pending
            pending = [s for s in pending if not shard_path(out, s).exists()]
            if not pending:
                return
            units, expected = [], {}
            for s in pending:
                lo, hi = s * cfg.shard_size, min(n, (s + 1) * cfg.shard_size)
                expected[s] = hi - lo
                units += [table.slice(i, min(unit, hi - i)) for i in range(lo, hi, unit)]
            if attempt > 1:
                retried["rows_redone"] += sum(expected.values())
            retried["attempts"] = attempt
            retried["attempt_started_at"].append(round(time.time(), 3))
            factor = _fit_resources(stages, ray.cluster_resources().get("CPU", 1.0))  # fewer CPUs after a node is lost
            _execute(ray, units, stages, factor, expected, out, manifest_cols, metadata, progress, stage_seconds, retried)

        run_with_reruns(run_left, retried, "extraction")
    finally:
        ctx.enable_progress_bars = saved
    return {"stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()}, "retried": retried}


def _execute(ray, units, stages, factor, expected, out, manifest_cols, metadata, progress, stage_seconds, retried) -> None:
    """Run the stages over the units; write each shard as soon as all its rows are in.

    Adds to ``stage_seconds`` (per stage) and to ``retried["rows_discarded"]`` (rows received for shards
    not yet written when a Ray failure stops the run: they are redone).
    """
    from tqdm import tqdm

    # from_blocks: one block per unit, metadata computed here (from_arrow runs a 1-CPU task per table,
    # which cannot be placed while a node's CPUs are still held by a failed run's actors)
    ds = ray.data.from_blocks(units)
    for st in stages:
        r = st.resources
        actor, args = (FusedStage, (st.kwargs["parts"], st.drop)) if st.cls.endswith(":FusedStage") else \
            (ArrowStage, (st.name, st.cls, st.kwargs, st.drop))
        # SPREAD: a pool's actors go to different nodes where they can, so one node lost is a share of each pool.
        ds = ds.map_batches(actor, fn_constructor_args=args, batch_size=None,
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=r.pool_size),
                            num_cpus=r.num_cpus * factor, num_gpus=r.num_gpus or None,
                            scheduling_strategy="SPREAD", **ACTOR_FT)
    buffers: dict[int, list] = defaultdict(list)
    got: Counter = Counter()
    bar = tqdm(total=sum(expected.values()), desc="extract", unit="utt", disable=not progress)
    try:
        for block in fetch_blocks(ray, ds):
            _collect(block, buffers, got, expected, out, manifest_cols, metadata, stage_seconds, retried)
            bar.update(block.num_rows)
    except retriable_errors():
        retried["rows_discarded"] += sum(got[s] for s in buffers)
        raise
    finally:
        bar.close()
    missing = {s: expected[s] - got[s] for s in expected if got[s] != expected[s]}
    if missing:
        raise ExtractError(f"pipeline lost rows in shards {missing}")


def _collect(block, buffers, got, expected, out, manifest_cols, metadata, stage_seconds, retried) -> None:
    """Buffer one finished block by shard; write every shard whose rows are all in."""
    import pyarrow.compute as pc

    for name in block.column_names:
        if name.startswith("_sec_"):
            stage_seconds[name[5:]] += pc.sum(block.column(name)).as_py() or 0.0
    for s in sorted(set(block.column("_shard").to_pylist())):
        part = block.filter(pc.equal(block.column("_shard"), s))
        buffers[s].append(part)
        got[s] += part.num_rows
        if got[s] == expected[s]:
            _write_shard(out, s, buffers.pop(s), manifest_cols, metadata)


def summarize(out_dir) -> dict:
    """Counts per status and the most common reasons, over a feature store."""
    import pyarrow.dataset as pds

    if not any(Path(out_dir).glob("part-*.parquet")):  # an empty manifest
        return {"rows": 0, "status": {"ok": 0, "partial": 0, "failed": 0}, "top_reasons": []}
    t = pds.dataset(str(out_dir), format="parquet").to_table(columns=["status", "error"])
    status = Counter(t.column("status").to_pylist())
    reasons: Counter = Counter()
    for err in t.column("error").to_pylist():
        for part in (err or "").split("; "):
            if part:
                reasons[part.split(": ")[0]] += 1
    return {"rows": t.num_rows, "status": {k: status.get(k, 0) for k in ("ok", "partial", "failed")},
            "top_reasons": reasons.most_common(10)}
