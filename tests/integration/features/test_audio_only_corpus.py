"""A corpus of isolated speech clips (every clip its own one-utterance dialogue, no transcripts, an ``audio``
column and no ``video`` column, as most speech emotion corpora are) through the real extraction job on a
local Ray: every row is ``ok`` with its eGeMAPS features, and nothing about faces or video is reported."""

from __future__ import annotations

import csv
import logging

import pyarrow.dataset as pds
import pytest

from mer_ray.demo import media as sm

# The shipped jobs/vanilla_clips_audio.yaml turns faces off; here the face and expression stages run, so the
# test also shows that they add nothing (no "no face" problem) for rows that named no video.
CONFIG = {"shard_size": 4, "batch_rows": 2, "text": False,
          "decode": {"pool_size": 1, "num_cpus": 0.4}, "face": {"pool_size": 1, "num_cpus": 0.4}}


@pytest.mark.ray
@pytest.mark.slow
def test_audio_only_clips_are_ok_with_audio_features_and_no_face_columns(ray_local, tmp_path, caplog):
    from mer_ray.features.job import run_extract

    rows = []
    for i, (label, f0, amp) in enumerate([("happy", 250, 0.5), ("sad", 120, 0.15), ("angry", 210, 0.8),
                                          ("neutral", 150, 0.3), ("happy", 240, 0.55), ("sad", 125, 0.12)]):
        clip = f"clip{i:02d}"
        sm.write_media(tmp_path / "wav" / f"{clip}.wav", audio=sm.voice(1.2 + 0.1 * i, f0=f0, amp=amp, seed=i))
        rows.append(dict(dialogue_id=clip, turn=0, speaker=f"actor{i % 2}", text="", audio=f"wav/{clip}.wav",
                         label=label, split="train"))
    manifest = tmp_path / "clips.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))  # no video column at all
        w.writeheader()
        w.writerows(rows)

    with caplog.at_level(logging.INFO, logger="mer_ray"):
        summary = run_extract(manifest, tmp_path / "feats", media_root=tmp_path, config=CONFIG, progress=False)
    assert summary["status"] == {"ok": 6, "partial": 0, "failed": 0} and summary["top_reasons"] == []
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("mer_ray") and r.levelno >= logging.WARNING]
    assert warned == []  # nothing about dialogues, speakers, empty texts or missing video
    t = pds.dataset(str(tmp_path / "feats"), format="parquet").to_table().sort_by("dialogue_id")
    assert t.column("dialogue_id").to_pylist() == [r["dialogue_id"] for r in rows]
    for r in t.to_pylist():
        assert r["status"] == "ok" and r["error"] is None, (r["dialogue_id"], r["error"])
        assert r["video"] is None and r["audio_seconds"] > 1.0
        assert len(r["audio_egemaps"]) == 88
        assert r["n_frames"] == 0 and r["n_face_frames"] == 0 and r["frame_times"] == []
        assert r["face_boxes"] is None and r["face_embedding"] is None and r["face_probs"] is None
        assert r["image_embedding"] is None and r["text_embedding"] is None  # text: false
