"""The same stages in one process, without Ray: a plain loop, as a user would write it.

Used by ``mer bench extract`` as the baseline, and by tests that need features
of a small corpus without starting Ray.
"""

from __future__ import annotations

import time
from collections import Counter

import pyarrow as pa

from mer_ray.config import load
from mer_ray.features.columns import FER_LABELS, to_table
from mer_ray.features.config import ExtractConfig
from mer_ray.features.job import _has_media, _load_manifest, assemble, media_plan
from mer_ray.features.stages import build_stages, load_class

_UNSET = object()


def run_local(manifest, media_root=None, config=None, threads=_UNSET, timings: Counter | None = None,
              load_timings: Counter | None = None) -> pa.Table:
    """Extract features in-process; returns the feature-store table (same columns as ``run_extract``).

    Args:
        manifest: a manifest path or ``pa.Table``.
        media_root: as for ``run_extract`` (default: the manifest's directory; none for a table: text only).
        config: an ``ExtractConfig``, dict, path or None.
        threads: override every stage's thread setting (None: each library's default).
        timings: if given, seconds per stage are added to it.
        load_timings: if given, model-loading seconds per stage are added to it.
    """
    cfg = load(ExtractConfig, config)
    table = _load_manifest(manifest)
    root, cfg = media_plan(manifest, table, media_root, cfg)
    specs = build_stages(cfg, root, cfg.media and _has_media(table))
    stages = []
    for spec in specs:
        kwargs = dict(spec.kwargs)
        if threads is not _UNSET and "threads" in kwargs:
            kwargs["threads"] = threads
        t0 = time.perf_counter()
        stages.append((spec.name, load_class(spec.cls)(**kwargs)))
        if load_timings is not None:
            load_timings[spec.name] += time.perf_counter() - t0
    manifest_cols = list(table.column_names)
    table = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    parts = []
    for lo in range(0, table.num_rows, cfg.batch_rows):
        chunk = table.slice(lo, cfg.batch_rows)
        batch = chunk.to_pydict()
        for name, stage in stages:
            t0 = time.perf_counter()
            batch.update(stage(batch))
            if timings is not None:
                timings[name] += time.perf_counter() - t0
        parts.append(to_table({k: v for k, v in batch.items() if k not in chunk.column_names}, base=chunk))
    return assemble(parts, manifest_cols, {"face_labels": list(FER_LABELS), "extract_config": cfg.model_dump(),
                                           "media_root": root})
