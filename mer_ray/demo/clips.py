"""A corpus of isolated emotional clips whose REAL extracted features depend on the label.

Most speech emotion corpora are isolated clips: each clip its own one-utterance
dialogue, no text. This module writes such a corpus from code, as real media
(H.264 + AAC mp4, or a PCM wav without faces), so that the feature pipeline's
openSMILE eGeMAPS (88 functionals, scales from ~0.01 to hundreds of Hz) and the
mini-Xception's ``face_embedding``/``face_probs`` are the features a user of a
real corpus would get, with labels that causally drive them.

Each label is a distribution, not a constant, and the distributions overlap:

- **voice**: per label a mean pitch, loudness, jitter, shimmer, syllable rate,
  pitch range, spectral tilt and breathiness; every clip draws each one with noise,
  on top of a random speaker pitch (drawn the same way for every label).
- **face**: per label a warp of the portrait's mouth corners and brows (smile,
  frown with raised inner brows, lowered knitted brows) of a random strength, and a
  tone curve; every clip adds nuisance (exposure, contrast, blur, size, position,
  background) that does not depend on the label.

Labels are IEMOCAP's 4-way set (``iemocap4``). The corpus is a pure function of
its arguments. Splits are stratified 60/20/20 per label.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

LABEL_SET = "iemocap4"
LABELS: tuple[str, ...] = ("happy", "sad", "neutral", "angry")
NOTICE = "generated clip corpus: labels drive the voice and the face; real openSMILE and FER features"

#: Per label, mean voice parameters: f0 (Hz), amplitude, jitter (per-cycle period sd), shimmer (per-cycle
#: amplitude sd), syllable rate (Hz), pitch range (relative modulation depth), spectral tilt (harmonic
#: k has amplitude k**-tilt), breathiness (noise relative to the voice).
VOICE_STYLE: dict[str, dict[str, float]] = {
    "happy": dict(f0=215, amp=0.30, jitter=0.010, shimmer=0.06, rate=4.8, range=0.12, tilt=1.05, breath=0.04),
    "sad": dict(f0=150, amp=0.13, jitter=0.012, shimmer=0.08, rate=3.2, range=0.04, tilt=1.65, breath=0.12),
    "neutral": dict(f0=170, amp=0.20, jitter=0.008, shimmer=0.05, rate=4.0, range=0.06, tilt=1.35, breath=0.05),
    "angry": dict(f0=195, amp=0.42, jitter=0.022, shimmer=0.12, rate=5.3, range=0.09, tilt=0.85, breath=0.07),
}
#: Per-clip noise (sd of a log-normal factor) of each voice parameter.
VOICE_NOISE: dict[str, float] = dict(f0=0.14, amp=0.35, jitter=0.45, shimmer=0.40, rate=0.18, range=0.45, tilt=0.16, breath=0.5)

#: Per label, the face: mean strength of each expression warp (see :func:`expression_bumps`) and a gamma.
FACE_STYLE: dict[str, dict[str, float]] = {
    "happy": dict(smile=1.6, frown=0.0, brows=0.0, gamma=0.9),
    "sad": dict(smile=0.0, frown=1.7, brows=0.0, gamma=1.15),
    "neutral": dict(smile=0.0, frown=0.0, brows=0.0, gamma=1.0),
    "angry": dict(smile=0.0, frown=0.0, brows=1.45, gamma=1.05),
}
#: sd of each warp's per-clip strength (a neutral face also twitches a little).
FACE_NOISE = 0.55

#: The portrait's head region (rows, cols) and the face box inside it (x, y, side), in portrait pixels.
HEAD = (slice(30, 420), slice(100, 432))
FACE_BOX = (55, 75, 222)


def _lognormal(rng: np.random.Generator, mean: float, sd: float) -> float:
    return float(mean * np.exp(rng.normal(0.0, sd)))


def voice(seconds: float, rate: int = 16000, f0: float = 170.0, amp: float = 0.2, jitter: float = 0.01,
          shimmer: float = 0.05, syllables: float = 4.0, pitch_range: float = 0.06, tilt: float = 1.3,
          breath: float = 0.05, seed: int = 0) -> np.ndarray:
    """A voiced-sounding waveform with cycle-level jitter and shimmer: float32 [seconds * rate] in [-1, 1].

    Like :func:`mer_ray.demo.media.voice` (harmonics of a wobbling f0 in syllable-like bursts), with the knobs
    that eGeMAPS measures: per-cycle period (jitter) and amplitude (shimmer) perturbation, pitch range,
    harmonic tilt (spectral slope, alpha ratio, Hammarberg index) and aspiration noise (HNR).
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    # Intonation: a slow contour plus a random walk, then per-cycle jitter held for one period.
    contour = 1 + pitch_range * np.sin(2 * np.pi * rng.uniform(0.8, 1.6) * t + rng.uniform(0, 6.3))
    walk = 0.02 * rng.standard_normal(n).cumsum() / np.sqrt(n)
    n_cycles = int(seconds * f0 * 2) + 2
    cycle = np.minimum((np.cumsum(f0 * contour / rate)).astype(int), n_cycles - 1)
    per_cycle_f = 1 + jitter * rng.standard_normal(n_cycles)
    per_cycle_a = np.clip(1 + shimmer * rng.standard_normal(n_cycles), 0.2, None)
    pitch = f0 * (contour + walk) * per_cycle_f[cycle]
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    k_max = max(1, int((rate / 2 - 200) // (f0 * 1.3)))
    wave = sum(np.sin(k * phase) / k ** tilt for k in range(1, min(k_max, 24) + 1))
    wave = wave / np.abs(wave).max().clip(1e-6)
    # Syllables: bursts at ``syllables`` Hz with a little irregularity, and silent gaps between them.
    syl_phase = 2 * np.pi * np.cumsum(syllables * (1 + 0.15 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6.3)))) / rate
    envelope = np.clip(np.sin(syl_phase + rng.uniform(0, 6.3)), 0, None) ** 1.5
    noise = rng.standard_normal(n)
    noise = np.convolve(noise, np.ones(3) / 3, mode="same")  # aspiration is not white
    sig = amp * envelope * (wave * per_cycle_a[cycle] + breath * 4 * noise) + 0.003 * rng.standard_normal(n)
    return np.clip(sig, -1, 1).astype(np.float32)


@lru_cache(maxsize=4)
def _head(height: int) -> np.ndarray:
    """The portrait's head region scaled to ``height`` rows (clips show it at about 110 px)."""
    from mer_ray.demo.media import portrait, resize

    return np.ascontiguousarray(resize(np.ascontiguousarray(portrait()[HEAD]), height))


def expression_bumps(smile: float = 0.0, frown: float = 0.0, brows: float = 0.0) -> list[tuple]:
    """Displacement bumps (u, v, du, dv, sigma), in units of the face box, for three expression warps:
    ``smile`` lifts and widens the mouth corners; ``frown`` lowers them and raises the inner brows;
    ``brows`` lowers and knits the brows and tightens the mouth. Negative strengths invert a warp."""
    return [
        (0.33, 0.80, -0.04 * smile, -0.05 * smile, 0.07), (0.67, 0.80, 0.04 * smile, -0.05 * smile, 0.07),
        (0.33, 0.80, 0.0, 0.05 * frown, 0.07), (0.67, 0.80, 0.0, 0.05 * frown, 0.07),
        (0.40, 0.33, 0.01 * frown, -0.04 * frown, 0.06), (0.60, 0.33, -0.01 * frown, -0.04 * frown, 0.06),
        (0.38, 0.33, 0.03 * brows, 0.05 * brows, 0.07), (0.62, 0.33, -0.03 * brows, 0.05 * brows, 0.07),
        (0.33, 0.80, 0.02 * brows, 0.0, 0.06), (0.67, 0.80, -0.02 * brows, 0.0, 0.06),
    ]


def face_image(smile: float = 0.0, frown: float = 0.0, brows: float = 0.0, gamma: float = 1.0, contrast: float = 1.0,
               blur: float = 0.0, height: int = 160) -> np.ndarray:
    """The portrait's head (uint8 [height, ~0.85 height, 3] RGB) with an expression warp, a tone curve and a
    blur (``blur``: Gaussian sigma in pixels of a 100-pixel face)."""
    import cv2

    img = _head(height)
    h, w = img.shape[:2]
    k = h / (HEAD[0].stop - HEAD[0].start)
    ox, oy, side = (v * k for v in FACE_BOX)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mx, my = xx.copy(), yy.copy()
    for u, v, du, dv, s in expression_bumps(smile, frown, brows):
        if du == 0 and dv == 0:
            continue
        cx, cy = ox + u * side, oy + v * side
        g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (s * side) ** 2))
        mx -= du * side * g  # remap reads the source at (mx, my): content moves by +du
        my -= dv * side * g
    out = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT).astype(np.float32) / 255.0
    out = np.clip((out - 0.5) * contrast + 0.5, 0, 1) ** gamma
    out = (out * 255).astype(np.uint8)
    if blur > 0:
        out = cv2.GaussianBlur(out, (0, 0), blur * side / 100)
    return out


def clip_params(label: str, rng: np.random.Generator) -> dict:
    """One clip's voice and face parameters, drawn around the label's style."""
    vs, fs = VOICE_STYLE[label], FACE_STYLE[label]
    speaker_f0 = float(np.exp(rng.normal(0, 0.12)))  # who speaks: shared by every label
    voice_p = {k: _lognormal(rng, m, VOICE_NOISE[k]) for k, m in vs.items()}
    voice_p["f0"] *= speaker_f0
    # An inverted warp is no expression, and a strongly inverted one (brows far up) hides the face from the detector.
    face_p = {k: float(np.clip(fs[k] + rng.normal(0, FACE_NOISE), -0.4, 3.0)) for k in ("smile", "frown", "brows")}
    face_p.update(gamma=_lognormal(rng, fs["gamma"], 0.15), contrast=_lognormal(rng, 1.0, 0.12),
                  blur=float(max(0.0, rng.normal(0.3, 0.5))))
    return {"voice": voice_p, "face": face_p, "seconds": float(rng.uniform(1.0, 1.5)),
            "size": float(rng.uniform(0.88, 1.0)), "x": float(rng.uniform(0.4, 0.6)),
            "bg": tuple(int(c) for c in rng.integers(60, 170, 3))}


def write_clip(path: Path, p: dict, seed: int, face: bool = True, fps: int = 8, width: int = 160, height: int = 120) -> Path:
    """Write one clip (mp4 with face and voice, or a wav when ``face`` is False) from :func:`clip_params`."""
    from mer_ray.demo import media as sm

    v = p["voice"]
    wav = voice(p["seconds"], f0=v["f0"], amp=min(v["amp"], 0.9), jitter=v["jitter"], shimmer=v["shimmer"],
                syllables=v["rate"], pitch_range=v["range"], tilt=v["tilt"], breath=v["breath"], seed=seed)
    if not face:
        return sm.write_media(path.with_suffix(".wav"), audio=wav)
    img = face_image(**p["face"])
    n = max(2, int(round(p["seconds"] * fps)))
    vid = sm.frames(n, width, height, img, face_height=int(height * p["size"]), x=p["x"], bg=p["bg"], seed=seed)
    return sm.write_media(path, vid, fps, wav)


def split_of(i: int, n: int) -> str:
    """Stratified 60/20/20: the ``i``-th of ``n`` shuffled clips of one label."""
    n_train, n_dev = int(round(0.6 * n)), int(round(0.2 * n))
    return "train" if i < n_train else ("dev" if i < n_train + n_dev else "test")


def make_clip_corpus(out_dir, n_per_label: int = 60, labels: tuple[str, ...] = LABELS, seed: int = 0,
                     face: bool = True) -> Path:
    """Write the clip corpus to ``out_dir`` and return its manifest (``manifest.jsonl``).

    Every row is its own dialogue (``dialogue_id`` = clip id, turn 0, empty speaker and text) with
    ``label``, ``split`` and ``video`` (an mp4 with face and voice) or, with ``face=False``, ``audio``
    (a wav). Media paths are relative to the manifest's directory (the default media root).
    ``corpus.json`` beside it records the label set and the arguments.

    Args:
        out_dir: directory to write.
        n_per_label: clips per label (split 60/20/20 per label).
        labels: labels to draw, each a key of :data:`VOICE_STYLE` (default: all of ``iemocap4``).
        seed: the corpus is a pure function of the arguments.
        face: write mp4 clips with a face (else audio-only wav files).
    """
    unknown = [lab for lab in labels if lab not in VOICE_STYLE]
    if unknown:
        raise ValueError(f"no style for labels {unknown}; known: {list(VOICE_STYLE)}")
    if n_per_label < 5:
        raise ValueError("n_per_label must be at least 5 (one dev and one test clip per label)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = np.random.default_rng([seed, 1]).permutation(len(labels) * n_per_label)  # ids say nothing of the label
    rows = []
    for li, label in enumerate(labels):
        order = rng.permutation(n_per_label)
        for j in range(n_per_label):
            k = li * n_per_label + j
            cid = f"clip{int(ids[k]):05d}"
            p = clip_params(label, rng)
            path = write_clip(out / "clips" / f"{cid}.mp4", p, seed=seed * 1_000_003 + k, face=face)
            row = dict(dialogue_id=cid, turn=0, speaker="", text="", label=label,
                       split=split_of(int(order[j]), n_per_label))
            row["video" if face else "audio"] = str(path.relative_to(out))
            rows.append(row)
    path = out / "manifest.jsonl"
    with path.open("w") as f:
        for r in sorted(rows, key=lambda r: r["dialogue_id"]):
            f.write(json.dumps(r) + "\n")
    (out / "corpus.json").write_text(json.dumps({"notice": NOTICE, "label_set": LABEL_SET, "labels": list(labels),
                                                 "n_per_label": n_per_label, "seed": seed, "face": face,
                                                 "rows": len(rows)}, indent=1))
    return path
