"""Decode stage: resolve media under the media root, sample frames over the span, decode 16 kHz mono audio.

Everything goes through PyAV in-process; no manifest string ever reaches a shell.
Problems are collected as ``"reason: detail"`` strings; ``_fatal`` marks media
that could not be used at all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class MediaError(Exception):
    """Media that cannot be used at all (the row becomes ``failed``)."""


def resolve_media(root: str | Path, value: str) -> Path:
    """``value`` resolved under ``root``; raises :class:`MediaError` if it leaves the root or does not exist."""
    root = Path(root).resolve()
    path = (root / value).resolve()  # an absolute value replaces root; symlinks are followed
    if path != root and root not in path.parents:
        raise MediaError(f"outside media root: {value!r} resolves outside {root}")
    if not path.is_file():
        raise MediaError(f"media file not found: {value!r} under {root}")
    return path


def _span(start, end, duration: float, name: str) -> tuple[float, float, list[str]]:
    """Clip the requested span to the media; the problems say how it was clipped."""
    s = 0.0 if start is None else float(start)
    e = duration if end is None else float(end)
    if e <= s:
        raise MediaError(f"invalid span: start {s:g} s is not before end {e:g} s")
    problems = []
    if s >= duration or e <= 0:
        problems.append(f"span outside media: {s:g}-{e:g} s lies wholly outside {name} ({duration:.2f} s long)")
        return s, s, problems
    if s < 0 or e > duration + 0.05:
        problems.append(f"span outside media: {s:g}-{e:g} s extends past {name} ({duration:.2f} s long), used the overlap")
    return max(s, 0.0), min(e, duration), problems


def _duration(container, stream) -> float:
    if stream is not None and stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    raise MediaError("unreadable media: unknown duration")


def read_frames(container, s: float, e: float, n: int, max_width: int,
                threads: int | None = None) -> tuple[np.ndarray, list[float]]:
    """``n`` frames sampled uniformly over [s, e): uint8 [k, h, w, 3] RGB (k <= n, duplicates removed) and their times."""
    stream = container.streams.video[0]
    if threads:
        stream.codec_context.thread_count = threads
    if e <= s:
        return np.zeros((0, 0, 0, 3), np.uint8), []
    targets = [s + (i + 0.5) * (e - s) / n for i in range(n)]
    container.seek(int(s * 1_000_000), backward=True, any_frame=False)
    picked, times, prev, i = [], [], None, 0
    for frame in container.decode(stream):
        t = float(frame.time) if frame.time is not None else 0.0
        while i < n and t > targets[i]:  # the frame on screen at targets[i] is the previous one
            cand = prev if prev is not None else frame
            if not times or times[-1] != float(cand.time or 0.0):
                picked.append(cand)
                times.append(float(cand.time or 0.0))
            i += 1
        if i >= n or t >= e:
            break
        prev = frame
    if i < n and prev is not None and (not times or times[-1] != float(prev.time or 0.0)):
        picked.append(prev)
        times.append(float(prev.time or 0.0))
    if not picked:
        return np.zeros((0, 0, 0, 3), np.uint8), []
    w, h = picked[0].width, picked[0].height
    if w > max_width:
        w, h = max_width, max(2, int(round(h * max_width / w / 2)) * 2)
    arr = np.stack([f.to_ndarray(format="rgb24", width=w, height=h) for f in picked])
    return arr, times


def read_audio(container, s: float, e: float, rate: int) -> np.ndarray:
    """Mono float32 samples at ``rate`` over [s, e)."""
    import av

    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    container.seek(int(s * 1_000_000), backward=True, any_frame=False)
    chunks, first = [], None
    for frame in container.decode(stream):
        t = float(frame.time) if frame.time is not None else 0.0
        if t >= e:
            break
        if t + frame.samples / frame.sample_rate <= s:
            continue
        if first is None:
            first = t
        for out in resampler.resample(frame):
            chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    if not chunks:
        return np.zeros(0, np.float32)
    pcm = np.concatenate(chunks).astype(np.float32)
    lo = max(0, int(round((s - first) * rate)))
    return pcm[lo: lo + int(round((e - s) * rate))]


def decode_row(root, video, audio, start, end, n_frames: int, max_width: int, rate: int, max_seconds: float,
               threads: int | None = None) -> dict:
    """Decode one manifest row; returns the stage's columns for that row (see :class:`DecodeStage`)."""
    import av

    out = dict(_frames=b"", _frame_shape=[0, 0, 0, 3], frame_times=[], n_frames=0, _audio=b"",
               audio_seconds=0.0, _problems=[], _fatal=False)
    if not video and not audio:
        return out
    try:
        problems: list[str] = []
        frames = None
        if video:
            path = resolve_media(root, video)
            try:
                with av.open(str(path)) as c:
                    vs = c.streams.video[0] if c.streams.video else None
                    has_audio = bool(c.streams.audio)
                    if vs is None and not has_audio:
                        raise MediaError(f"unreadable media: {video!r} has no video or audio stream")
                    s, e, p = _span(start, end, _duration(c, vs or c.streams.audio[0]), repr(video))
                    problems += p
                    if vs is None:
                        problems.append(f"no video stream: {video!r} is audio-only")
                    else:
                        frames, times = read_frames(c, s, e, n_frames, max_width, threads)
                        if len(times) == 0 and e > s:
                            raise MediaError(f"corrupt media: no frame of {video!r} could be decoded")
                    pcm = None
                    if not audio:
                        if has_audio:
                            pcm = read_audio(c, s, min(e, s + max_seconds), rate)
                        else:
                            problems.append(f"no audio track: {video!r} has no audio stream")
            except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as err:
                raise MediaError(f"unreadable media: {video!r} ({type(err).__name__}: {err})") from None
        # A row that names no video asked for none: nothing is missing, so no problem (status ``ok``).
        if audio:
            apath = resolve_media(root, audio)
            try:
                with av.open(str(apath)) as c:
                    if not c.streams.audio:
                        raise MediaError(f"unreadable media: {audio!r} has no audio stream")
                    s, e, p = _span(start, end, _duration(c, c.streams.audio[0]), repr(audio))
                    problems += p
                    pcm = read_audio(c, s, min(e, s + max_seconds), rate)
            except (av.error.FFmpegError, UnicodeDecodeError, ValueError, IndexError) as err:
                raise MediaError(f"unreadable media: {audio!r} ({type(err).__name__}: {err})") from None
        if pcm is not None and e - s > max_seconds:
            problems.append(f"audio cut: span {e - s:.1f} s longer than max_seconds {max_seconds:g}, used the first part")
    except MediaError as err:
        out.update(_problems=[str(err)], _fatal=True)
        return out
    except Exception as err:  # noqa: BLE001 - one bad row never stops the run
        out.update(_problems=[f"unreadable media: {video or audio!r} ({type(err).__name__}: {err})"], _fatal=True)
        return out
    if frames is not None and len(frames):
        out.update(_frames=frames.tobytes(), _frame_shape=list(frames.shape), frame_times=times, n_frames=len(frames))
    if pcm is not None:
        out.update(_audio=pcm.tobytes(), audio_seconds=len(pcm) / rate)
    out["_problems"] = problems
    return out


class DecodeStage:
    """Adds ``_frames``, ``_frame_shape``, ``frame_times``, ``n_frames``, ``_audio``, ``audio_seconds``,
    ``_problems`` and ``_fatal`` to a batch with ``video``/``audio``/``start``/``end`` columns."""

    def __init__(self, media_root: str, n_frames: int = 8, max_width: int = 320, sample_rate: int = 16000,
                 max_seconds: float = 60.0, threads: int | None = 1):
        self.root, self.n, self.w, self.rate, self.max_s = media_root, n_frames, max_width, sample_rate, max_seconds
        self.threads = threads

    def __call__(self, batch: dict) -> dict:
        n = len(batch["text"])
        get = lambda col: list(batch[col]) if col in batch else [None] * n  # noqa: E731
        rows = [decode_row(self.root, v, a, s, e, self.n, self.w, self.rate, self.max_s, self.threads)
                for v, a, s, e in zip(get("video"), get("audio"), get("start"), get("end"))]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
