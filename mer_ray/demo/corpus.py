"""A generated dialogue corpus for ``make demo``: a plumbing check, never an accuracy figure.

No data ships with the project, so the demo builds its own corpus. Texts carry
label-dependent wording, but a share of utterances use another label's cue or
none at all, so the task is not trivial. Labels are ``meld7``; each dialogue has
a ``split`` (train/dev/test). Sentiment follows MELD's emotion-to-polarity map,
and valence/arousal/dominance (1-5) are noisy label-dependent values.
With ``media=True`` every utterance also gets a short mp4 clip (a face whose
appearance, and a voice whose pitch and loudness, depend on the label; each
modality is noisy on its own), written by :func:`write_clips`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mer_ray.data.labels import get_label_set, map_label

NOTICE = "generated corpus: a plumbing check, not a measure of accuracy"

#: Label frequencies, roughly MELD's (neutral dominates).
PRIORS = {"neutral": 0.42, "joy": 0.17, "surprise": 0.12, "anger": 0.11, "sadness": 0.08, "disgust": 0.05, "fear": 0.05}
#: Cue phrases per label.
CUES = {
    "neutral": ["okay", "I see", "sure", "right", "fine, I guess", "we can talk later", "that's the plan"],
    "joy": ["this is wonderful", "I love it", "great news", "that's so nice", "I'm really happy", "awesome"],
    "surprise": ["wait, what?", "no way", "really?", "are you serious", "I can't believe it", "whoa"],
    "anger": ["this is ridiculous", "stop it", "I'm so mad", "get out", "how dare you", "unbelievable, you did it again"],
    "sadness": ["I miss her", "it's over", "I feel terrible", "nobody called", "that's so sad", "I'm sorry"],
    "disgust": ["gross", "that's disgusting", "ew", "I can't look at it", "that smells awful", "yuck"],
    "fear": ["I'm scared", "what was that noise", "please don't go", "I'm nervous", "that's terrifying", "help"],
}
FILLERS = ["about the apartment", "with Joey", "at the coffee house", "after work", "this morning",
           "for the party", "on the phone", "", "", "you know", "honestly"]
NAMES = ["Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe", "Gunther", "Janice"]
#: Mean valence, arousal, dominance (1-5) per label.
VAD = {"neutral": (3.0, 2.5, 3.0), "joy": (4.3, 3.6, 3.5), "surprise": (3.4, 4.2, 2.9), "anger": (1.8, 4.4, 3.9),
       "sadness": (1.7, 2.0, 2.0), "disgust": (1.9, 3.2, 3.3), "fear": (1.8, 3.9, 1.9)}


def _text(rng: np.random.Generator, label: str, noise: float) -> str:
    labels = list(CUES)
    roll = rng.random()
    if roll < noise * 0.5:  # another label's cue: misleading
        cue_label = labels[rng.integers(len(labels))]
    elif roll < noise:  # a neutral cue: uninformative
        cue_label = "neutral"
    else:
        cue_label = label
    cue = CUES[cue_label][rng.integers(len(CUES[cue_label]))]
    filler = FILLERS[rng.integers(len(FILLERS))]
    text = f"{cue} {filler}".strip()
    return text[0].upper() + text[1:] + ("." if rng.random() < 0.5 else "")


def make_rows(n_dialogues: int = 60, seed: int = 0, noise: float = 0.4) -> list[dict]:
    """Utterance rows in the manifest schema, plus ``split``; deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    labels = list(PRIORS)
    p = np.array(list(PRIORS.values()))
    p = p / p.sum()
    rows = []
    for d in range(n_dialogues):
        split = (("train",) * 7 + ("dev", "test", "test" if d % 20 < 10 else "dev"))[d % 10]
        speakers = list(rng.choice(NAMES, size=int(rng.integers(2, 4)), replace=False))
        mood = {s: labels[rng.choice(len(labels), p=p)] for s in speakers}
        for t in range(int(rng.integers(4, 11))):
            spk = speakers[rng.integers(len(speakers))] if t else speakers[0]
            # Emotions persist per speaker: context helps, as in real conversations.
            label = mood[spk] if rng.random() < 0.5 else labels[rng.choice(len(labels), p=p)]
            mood[spk] = label
            sent = map_label(label, "meld7", "meld_sentiment3") or ("positive" if rng.random() < 0.5 else "negative")
            v, a, dm = (float(np.clip(m + rng.normal(0, 0.5), 1, 5)) for m in VAD[label])
            rows.append(dict(dialogue_id=f"{split}/d{d:04d}", turn=t, speaker=spk, text=_text(rng, label, noise),
                             label=label, sentiment=sent, valence=round(v, 3), arousal=round(a, 3),
                             dominance=round(dm, 3), split=split))
    get_label_set("meld7")  # the labels above are meld7's
    return rows


#: Per label: voice pitch (Hz), loudness, and the face's gamma (brightness curve) and size (share of frame height).
MEDIA_STYLE = {"neutral": (150, 0.20, 1.0, 0.70), "joy": (230, 0.35, 0.6, 0.80), "surprise": (290, 0.40, 0.8, 0.60),
               "anger": (200, 0.60, 1.7, 0.75), "sadness": (115, 0.10, 1.3, 0.55), "disgust": (170, 0.30, 2.2, 0.65),
               "fear": (260, 0.22, 0.45, 0.50)}


def write_clips(rows: list[dict], media_dir: Path, seed: int = 0, seconds: tuple[float, float] = (1.2, 2.4),
                fps: int = 8, width: int = 256, height: int = 192) -> None:
    """Write one mp4 per row under ``media_dir`` and set the row's ``video`` (relative to it).

    The face (matplotlib's portrait) gets a label-dependent brightness curve and size, the
    voice a label-dependent pitch and loudness, each with per-utterance noise.
    """
    from mer_ray.demo import media as sm

    rng = np.random.default_rng(seed + 7919)
    face = sm.portrait().astype(np.float32) / 255.0
    for i, r in enumerate(rows):
        f0, amp, gamma, size = MEDIA_STYLE[r["label"]]
        dur = float(rng.uniform(*seconds))
        g = gamma * float(np.exp(rng.normal(0, 0.25)))
        img = (np.clip(face ** g, 0, 1) * 255).astype(np.uint8)
        n = max(2, int(round(dur * fps)))
        vid = sm.frames(n, width, height, img, face_height=int(height * size * float(rng.uniform(0.9, 1.1))),
                        x=float(rng.uniform(0.35, 0.65)), seed=seed * 100003 + i)
        wav = sm.voice(dur, f0=f0 * float(np.exp(rng.normal(0, 0.15))), amp=amp * float(np.exp(rng.normal(0, 0.3))),
                       seed=seed * 100003 + i)
        rel = f"clips/{r['dialogue_id'].replace('/', '_')}_t{r['turn']}.mp4"
        sm.write_media(media_dir / rel, vid, fps, wav)
        r["video"] = rel  # one clip per utterance, as in MELD: no start/end needed


def make_corpus(out_dir, n_dialogues: int = 60, seed: int = 0, media: bool = False, noise: float = 0.4) -> Path:
    """Write a generated corpus to ``out_dir`` and return its manifest path (``manifest.jsonl``).

    Args:
        out_dir: directory to write; media go under ``out_dir/media``, the media root to pass to
            ``mer extract`` (``video`` paths are relative to it).
        n_dialogues: dialogues to generate (4-10 turns each).
        seed: the corpus is a pure function of the arguments.
        media: also write one mp4 clip per utterance (faces, voice) and set ``video``.
        noise: share of utterances whose wording carries no or a misleading cue.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_dialogues, seed, noise)
    if media:
        write_clips(rows, out / "media", seed=seed)
    path = out / "manifest.jsonl"
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "README.txt").write_text(NOTICE + "\n")
    return path
