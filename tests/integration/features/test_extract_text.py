"""Text path of ``mer extract``: the MiniLM stage on a plain dict, and the Ray pipeline on a small manifest."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pds
import pytest

from mer_ray.demo.corpus import make_corpus


def test_text_stage_on_plain_dict():
    from mer_ray.features.text import TextStage

    stage = TextStage()
    out = stage({"text": ["I love it", "", "I love it"]})
    emb = np.array(out["text_embedding"], dtype=np.float32)
    assert emb.shape == (3, 384)
    # rows 0 and 2 of one padded batch: the same token ids and mask through the same ops (every output row
    # depends on its own row only, accumulated in the same order): identical
    np.testing.assert_array_equal(emb[0], emb[2])
    assert np.isfinite(emb).all() and np.abs(emb[1]).sum() > 0  # empty text is embedded, not zeroed


@pytest.mark.ray
@pytest.mark.slow
def test_text_only_pipeline_keeps_every_row_and_resumes(ray_local, tmp_path):
    from mer_ray.data.loaders import load_manifest
    from mer_ray.features.job import run_extract

    manifest = make_corpus(tmp_path / "corpus", n_dialogues=6, seed=1)
    src = load_manifest(manifest)
    cfg = {"shard_size": 16, "batch_rows": 8}
    # A pa.Table is accepted as well as a path; with the manifest's directory as media root they are the same run.
    summary = run_extract(src, tmp_path / "feat", media_root=manifest.parent, config=cfg, progress=False)
    table = pds.dataset(str(tmp_path / "feat"), format="parquet").to_table().sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])
    assert table.num_rows == src.num_rows == summary["rows"]
    assert table.column("text").to_pylist() == src.column("text").to_pylist()
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("error").null_count == table.num_rows
    assert all(len(e) == 384 for e in table.column("text_embedding").to_pylist())
    assert table.column("face_embedding").null_count == table.num_rows  # no media: null, never zeros
    assert summary["status"] == {"ok": src.num_rows, "partial": 0, "failed": 0}
    # A re-run skips every finished shard.
    again = run_extract(manifest, tmp_path / "feat", config=cfg, progress=False)
    assert again["shards_skipped"] == again["shards"] == summary["shards"] > 1


def test_table_without_media_root_is_text_only(tmp_path):
    """MELD's table names clips that are not here: without a media root, text only (no Ray needed)."""
    import pyarrow as pa

    from mer_ray.features.local import run_local

    t = pa.table({"dialogue_id": ["d", "d"], "turn": [0, 1], "speaker": ["A", "B"], "text": ["hi", "no way"],
                  "video": ["dia0_utt0.mp4", "dia0_utt1.mp4"]})
    from mer_ray.features.config import ExtractConfig
    from mer_ray.features.job import media_plan

    root, cfg = media_plan(t, t, None, ExtractConfig())  # what run_extract decides too
    assert root is None and cfg.media is False
    root, cfg = media_plan(tmp_path / "m.jsonl", t, None, ExtractConfig())
    assert root == str(tmp_path.resolve()) and cfg.media is True
    out = run_local(t, config={"faces": False, "audio_encoder": "none"})
    assert out.column("status").to_pylist() == ["ok", "ok"] and out.column("n_frames").null_count == 2


def test_empty_manifest_gives_an_empty_typed_store(tmp_path):
    import pyarrow as pa

    from mer_ray.features.job import run_extract

    t = pa.table({"dialogue_id": pa.array([], pa.string()), "turn": pa.array([], pa.int64()),
                  "speaker": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    summary = run_extract(t, tmp_path / "empty", progress=False)  # no rows: Ray is not even started
    store = pds.dataset(str(tmp_path / "empty"), format="parquet").to_table()
    assert summary["rows"] == store.num_rows == 0
    assert {"status", "text_embedding", "face_embedding"} <= set(store.column_names)
