"""Test media written from code: one row per status case, with the expected status and reason."""

from __future__ import annotations

import os
from pathlib import Path

from mer_ray.demo import media as sm


def build_media_set(root: Path, outside: Path) -> list[dict]:
    """Write clips under ``root`` (and a decoy under ``outside``); return manifest rows, each with
    ``expect`` (status) and ``reason`` (the start of its error, or None)."""
    root.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    sm.clip(root / "clips/face.mp4", seconds=2.0, seed=1)
    sm.clip(root / "clips/noface.mp4", seconds=2.0, face=False, seed=2)
    sm.clip(root / "clips/silent_movie.mp4", seconds=2.0, audio=False, seed=3)
    sm.write_media(root / "clips/voice.m4a", audio=sm.voice(1.5, seed=4))
    sm.write_media(root / "audio/voice.wav", audio=sm.voice(1.5, seed=5))
    sm.clip(root / "sessions/long.mp4", seconds=8.0, seed=6)
    (root / "clips/corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    sm.clip(outside / "secret.mp4", seconds=1.0, seed=7)
    (root / "clips/escape.mp4").symlink_to(outside / "secret.mp4")
    cases = [
        ("face", dict(video="clips/face.mp4"), "ok", None),
        ("noface", dict(video="clips/noface.mp4"), "partial", "no face"),
        ("no_audio_track", dict(video="clips/silent_movie.mp4"), "partial", "no audio track"),
        ("audio_only_file", dict(video="clips/voice.m4a"), "partial", "no video stream"),
        ("audio_only_row", dict(audio="audio/voice.wav"), "ok", None),  # asked for audio only: nothing missing
        ("span_inside", dict(video="sessions/long.mp4", start=2.0, end=4.5), "ok", None),
        ("span_partly_outside", dict(video="sessions/long.mp4", start=6.5, end=10.0), "partial", "span outside media"),
        ("span_wholly_outside", dict(video="sessions/long.mp4", start=20.0, end=23.0), "partial", "span outside media"),
        ("corrupt", dict(video="clips/corrupt.mp4"), "failed", "unreadable media"),
        ("missing", dict(video="clips/missing.mp4"), "failed", "media file not found"),
        ("dotdot", dict(video=f"../{outside.name}/secret.mp4"), "failed", "outside media root"),
        ("absolute", dict(video=str(outside / "secret.mp4")), "failed", "outside media root"),
        ("symlink_escape", dict(video="clips/escape.mp4"), "failed", "outside media root"),
        ("text_only", dict(), "ok", None),
    ]
    rows = []
    for i, (name, media, expect, reason) in enumerate(cases):
        row = dict(dialogue_id="d0", turn=i, speaker="A" if i % 2 else "B", text=f"utterance {name}",
                   video=None, start=None, end=None, audio=None, case=name, expect=expect, reason=reason)
        row.update(media)
        rows.append(row)
    return rows
