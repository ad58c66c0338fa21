"""Media written from code (PyAV): clips with frames, a real face, and a generated voice.

Used by the test suite, the demo corpus and ``mer bench extract``; nothing binary
is committed. The face is the portrait shipped in matplotlib's sample data.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np


@lru_cache(maxsize=1)
def portrait() -> np.ndarray:
    """matplotlib's ``grace_hopper.jpg``: uint8 [600, 512, 3] RGB, a frontal face."""
    import matplotlib.cbook as cbook
    import matplotlib.image as mimage

    return np.ascontiguousarray(mimage.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))[..., :3])


def resize(img: np.ndarray, height: int) -> np.ndarray:
    """``img`` scaled to ``height`` rows, aspect kept."""
    import cv2

    w = max(1, int(round(img.shape[1] * height / img.shape[0])))
    return cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA)


def frames(n: int, width: int = 320, height: int = 240, face: np.ndarray | None = None, face_height: int = 180,
           x: float = 0.5, bg: tuple[int, int, int] = (90, 110, 130), seed: int = 0) -> np.ndarray:
    """``n`` frames uint8 [n, height, width, 3]: a textured background, and ``face`` (if any) pasted at
    horizontal position ``x`` (0-1) with a little motion, so frames differ."""
    rng = np.random.default_rng(seed)
    base = np.empty((height, width, 3), np.uint8)
    base[:] = bg
    base = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    out = np.repeat(base[None], n, axis=0)
    if face is not None:
        f = resize(face, min(face_height, height))
        fh, fw = f.shape[:2]
        for i in range(n):
            dx = int(round(4 * np.sin(i / 3)))
            x0 = int(np.clip(x * width - fw / 2 + dx, 0, width - fw))
            y0 = (height - fh) // 2
            out[i, y0:y0 + fh, x0:x0 + fw] = f
    return out


def voice(seconds: float, rate: int = 16000, f0: float = 160.0, amp: float = 0.3, jitter: float = 0.02,
          seed: int = 0) -> np.ndarray:
    """A voiced-sounding waveform: harmonics of a wobbling ``f0``, syllable-like bursts, a little noise.
    float32 [seconds * rate] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t) + jitter * rng.standard_normal(len(t)).cumsum() / np.sqrt(len(t)))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    wave = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6.3))) ** 2 / 2
    sig = amp * wave * envelope / 1.5 + 0.01 * rng.standard_normal(len(t))
    return np.clip(sig, -1, 1).astype(np.float32)


def write_media(path: str | Path, video: np.ndarray | None = None, fps: int = 10, audio: np.ndarray | None = None,
                rate: int = 16000) -> Path:
    """Write an mp4 (H.264 video and/or AAC audio) or, for a ``.wav`` path, PCM audio.

    Args:
        video: uint8 [n, h, w, 3] RGB frames, or None for an audio-only file.
        audio: float32 [samples] mono at ``rate``, or None for a file without an audio track.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        vs = None
        if video is not None:
            vs = c.add_stream("libx264", rate=fps)
            vs.height, vs.width = video.shape[1] // 2 * 2, video.shape[2] // 2 * 2
            vs.pix_fmt = "yuv420p"
            vs.options = {"preset": "ultrafast", "tune": "zerolatency"}
        aus = None
        if audio is not None:
            aus = c.add_stream("pcm_s16le" if path.suffix == ".wav" else "aac", rate=rate, layout="mono")
        if vs is not None:
            for img in video:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[: vs.height, : vs.width]), format="rgb24")
                for p in vs.encode(frame):
                    c.mux(p)
            for p in vs.encode():
                c.mux(p)
        if aus is not None:
            step = 1024
            fmt = "s16" if path.suffix == ".wav" else "fltp"
            for i in range(0, len(audio), step):
                chunk = audio[i:i + step]
                data = (chunk * 32767).astype(np.int16)[None] if fmt == "s16" else chunk.astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout="mono")
                frame.sample_rate, frame.pts, frame.time_base = rate, i, Fraction(1, rate)
                for p in aus.encode(frame):
                    c.mux(p)
            for p in aus.encode():
                c.mux(p)
    return path


def clip(path, seconds: float = 3.0, fps: int = 10, width: int = 320, height: int = 240, face: bool = True,
         audio: bool = True, f0: float = 160.0, seed: int = 0) -> Path:
    """One utterance clip: frames (with the portrait if ``face``) and a voice track (if ``audio``)."""
    n = max(1, int(round(seconds * fps)))
    vid = frames(n, width, height, portrait() if face else None, face_height=int(height * 0.75), seed=seed)
    return write_media(path, vid, fps, voice(seconds, f0=f0, seed=seed) if audio else None)
