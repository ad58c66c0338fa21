"""``mer extract`` on real media with a real local Ray: every status, the output contract,
resume after a killed run, exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from tests.media import build_media_set  # noqa: E402

MER = str(Path(sys.executable).parent / "mer")
CONFIG = {"shard_size": 4, "batch_rows": 2, "n_frames": 4,
          "decode": {"pool_size": 1, "num_cpus": 0.4}, "face": {"pool_size": 1, "num_cpus": 0.4}}


@pytest.fixture(scope="module")
def media_manifest(tmp_path_factory):
    base = tmp_path_factory.mktemp("extract_media")
    rows = build_media_set(base / "root", base / "outside")
    # Twice over (two dialogues), so a run has enough shards to be killed midway.
    rows = rows + [dict(r, dialogue_id="d1") for r in rows]
    manifest = base / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), manifest)
    (base / "config.json").write_text(json.dumps(CONFIG))
    return base, manifest


def _read(out) -> pa.Table:
    t = pds.dataset(str(out), format="parquet").to_table()
    return t.sort_by([("dialogue_id", "ascending"), ("turn", "ascending")])


@pytest.fixture(scope="module")
def clean_run(ray_local, media_manifest):
    from mer_ray.features.job import run_extract

    base, manifest = media_manifest
    summary = run_extract(manifest, base / "clean", media_root=base / "root", config=CONFIG, progress=False)
    return summary, _read(base / "clean")


@pytest.mark.ray
@pytest.mark.slow
def test_statuses_and_output_contract(clean_run, media_manifest):
    summary, t = clean_run
    assert t.num_rows == 28 == summary["rows"]  # every input row kept
    for r in t.to_pylist():
        assert r["status"] == r["expect"], (r["case"], r["status"], r["error"])
        assert (r["error"] is None) == (r["status"] == "ok"), r["case"]
        if r["reason"]:
            assert r["error"].startswith(r["reason"]), (r["case"], r["error"])
        assert len(r["text_embedding"]) == 384  # text whatever the media's status
        has_face = r["n_face_frames"] > 0
        assert (r["face_embedding"] is not None) == has_face and (r["face_probs"] is not None) == has_face
        if has_face:
            assert len(r["face_embedding"]) == 128 and len(r["face_probs"]) == 7
            assert len(r["face_boxes"]) == r["n_frames"]
        assert (r["audio_egemaps"] is not None) == (r["audio_seconds"] > 0.1), r["case"]
    assert summary["status"] == {"ok": 8, "partial": 10, "failed": 10}
    reasons = dict(summary["top_reasons"])
    assert reasons["outside media root"] == 6 and reasons["span outside media"] == 4
    meta = pq.read_schema(next(Path(media_manifest[0] / "clean").glob("part-*.parquet"))).metadata
    assert json.loads(meta[b"face_labels"]) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
    state = [p.name for p in (media_manifest[0] / "clean").iterdir() if not p.name.startswith("part-")]
    assert state and all(n.startswith(("_", ".")) for n in state)


@pytest.mark.ray
@pytest.mark.slow
def test_one_pool_per_stage_equals_the_fused_pool(ray_local, clean_run, media_manifest):
    """``fuse: false`` (one actor pool per stage, frames through the object store) gives the same table as the
    default fused pool (all stages in one actor)."""

    from mer_ray.features.job import run_extract

    base, manifest = media_manifest
    summary = run_extract(manifest, base / "per_stage", media_root=base / "root", config={**CONFIG, "fuse": False},
                          progress=False)
    assert set(summary["stage_seconds"]) == {"decode", "face", "expression", "audio", "text"}
    assert set(clean_run[0]["stage_seconds"]) == {"decode", "face", "expression", "audio", "text"}
    per_stage, fused = _read(base / "per_stage"), clean_run[1]
    assert per_stage.column_names == fused.column_names
    # Every stage maps whole units of batch_rows rows in both layouts, so each row meets the same batch-mates
    # in the same stage code with the same torch threads: the float features are identical, bit for bit.
    for a, b in zip(per_stage.to_pylist(), fused.to_pylist()):
        for k, va in a.items():
            assert va == b[k], (a["case"], k)


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.ray
@pytest.mark.slow
def test_resume_after_killed_run_equals_clean_run(ray_local, clean_run, media_manifest):
    base, manifest = media_manifest
    out = base / "killed"
    # The command attaches to this session's own local Ray (started by ray_local), which saves two Ray starts.
    address = ray_local.get_runtime_context().gcs_address
    cmd = [MER, "extract", "--manifest", str(manifest), "--out", str(out), "--media-root", str(base / "root"),
           "--config", str(base / "config.json"), "--no-progress", "--ray-address", address]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600  # generous: other jobs may share the cores
    while time.time() < deadline and proc.poll() is None and not list(out.glob("part-*.parquet")):
        time.sleep(0.1)
    done_at_kill = len(list(out.glob("part-*.parquet")))
    _kill_tree(proc)
    assert 0 < done_at_kill < 7, f"kill landed at {done_at_kill} of 7 shards"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done" in again.stdout and "partial: 10" in again.stdout and "failed: 10" in again.stdout
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["shards_skipped"] >= done_at_kill
    resumed, clean = _read(out), clean_run[1]
    assert resumed.column_names == clean.column_names
    assert resumed.to_pylist() == clean.to_pylist()  # equal to a clean run, floats included


@pytest.mark.slow  # three `mer extract` processes, ~25 s
def test_exit_codes_when_the_run_cannot_complete(tmp_path, media_manifest):
    base, manifest = media_manifest
    r = subprocess.run([MER, "extract", "--manifest", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "nope.jsonl" in r.stderr
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "_extract_state.json").write_text(json.dumps({"fingerprint": "another run"}))
    r = subprocess.run([MER, "extract", "--manifest", str(manifest), "--out", str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "different manifest" in r.stderr
