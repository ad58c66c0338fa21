"""Feature extraction for served requests: the extract pipeline's own stage classes, on one dialogue.

Text goes through the packaged MiniLM (:class:`mer_ray.features.text.TextStage`).
When an utterance carries ``video_b64``/``audio_b64``, the decoded bytes are
written to a fresh temporary directory owned by this process, and the extract
pipeline's decode/face/expression/audio stages run on those files only: the
media root is that directory, and the file names are ours, so no request can
name a server file. Rows come out in the feature-store layout (nulls, never
zeros, where a feature could not be computed).
"""

from __future__ import annotations

import base64
import tempfile
import threading
from pathlib import Path

import numpy as np

from mer_ray.features.columns import MODEL_FEATURES
from mer_ray.serve.schemas import decode_media


class MediaError(ValueError):
    """An uploaded clip could not be decoded at all (answered with 422)."""


_FEATURES = MODEL_FEATURES  # every column a model may read
#: Utterances per padded MiniLM chunk in a batch (the encoder sorts by length first, so a chunk pads to
#: nearly its own length; 32 keeps the matrices large enough to be efficient on a CPU core).
TEXT_CHUNK = 32


class RequestFeaturizer:
    """``featurize(utterances) -> rows``; callable without Ray.

    Args:
        threads: ``torch.set_num_threads`` for the encoders.
        extract_config: settings of the media stages (an ``ExtractConfig`` dict); None: defaults.
    """

    def __init__(self, threads: int = 1, extract_config: dict | None = None):
        from mer_ray.features.text import TextStage

        self.text = TextStage(threads=threads)
        self.threads, self.extract_config = threads, extract_config or {}
        self._media = None  # loaded on the first request that sends media
        self._lock = threading.Lock()  # requests overlap in Serve's thread pool; the media encoders run one at a time

    def _media_stages(self) -> list:
        if self._media is None:
            from mer_ray.config import load
            from mer_ray.features.config import ExtractConfig
            from mer_ray.features.stages import build_stages, load_class


            key = "threads" if "threads" in ExtractConfig.model_fields else "torch_threads"
            cfg = load(ExtractConfig, {**self.extract_config, "text": False, key: self.threads})
            specs = build_stages(cfg, media_root=None, has_media=True)
            # decode is rebuilt per request (its media root is the request's temp dir); the encoders load once
            self._media = [(s, load_class(s.cls), None if "media_root" in s.kwargs else load_class(s.cls)(**s.kwargs))
                           for s in specs]
        return self._media

    def _run_media(self, utterances: list[dict], idx: list[int]) -> dict[int, dict]:
        from mer_ray.features.columns import finalize

        with tempfile.TemporaryDirectory(prefix="mer-serve-") as tmp:
            batch: dict[str, list] = {"_row": [], "dialogue_id": [], "turn": [], "speaker": [], "text": [], "video": [], "audio": []}
            for i in idx:
                u = utterances[i]
                names = {}
                for key, col, ext in (("video_b64", "video", "mp4"), ("audio_b64", "audio", "wav")):
                    data = u.get(key)
                    if data is not None:
                        raw = data if isinstance(data, bytes) else decode_media(data, key)
                        names[col] = f"u{i}_{col}.{ext}"
                        (Path(tmp) / names[col]).write_bytes(raw)
                batch["_row"].append(i)
                batch["dialogue_id"].append("request")
                batch["turn"].append(i)
                batch["speaker"].append(u.get("speaker", ""))
                batch["text"].append(u.get("text", ""))
                batch["video"].append(names.get("video"))
                batch["audio"].append(names.get("audio"))  # None: the video's own audio track is used
            for spec, cls, stage in self._media_stages():
                stage = stage or cls(**{**spec.kwargs, "media_root": tmp})
                batch.update(stage(batch))
            batch.update(finalize(batch))
        out = {}
        for k, i in enumerate(batch["_row"]):
            if batch.get("_fatal") and batch["_fatal"][k]:
                raise MediaError(f"utterances[{i}]: the uploaded media could not be decoded: {batch['error'][k]}")
            out[i] = {c: batch[c][k] for c in ("status", "error", *_FEATURES) if c in batch}
        return out

    def featurize(self, utterances: list[dict]) -> list[dict]:
        """Plain dicts (``speaker``, ``text``, optional ``video_b64``/``audio_b64``) -> feature rows."""
        out = self.featurize_batch([utterances])[0]
        if isinstance(out, Exception):
            raise out
        return out

    def featurize_batch(self, dialogues: list[list[dict]]) -> list[list[dict] | Exception]:
        """:meth:`featurize` of ``D`` dialogues: one tokenisation and MiniLM pass over all their utterances.

        The encoder sorts the utterances by length and pads each chunk of ``TEXT_CHUNK`` to its own longest,
        so mixing long and short dialogues costs little padding. Media run per dialogue (one at a time).

        Returns:
            ``[D]`` lists of rows; a dialogue whose media could not be decoded holds its :class:`MediaError`.
        """
        texts = [u.get("text", "") for utts in dialogues for u in utts]
        emb = self.text.encode(texts, batch_size=TEXT_CHUNK) if texts else np.zeros((0, 384), np.float32)
        out: list[list[dict] | Exception] = []
        start = 0
        for utterances in dialogues:
            rows = [{"turn": i, "speaker": u.get("speaker", ""), "text": u.get("text", ""),
                     "text_embedding": emb[start + i].tolist(), "status": "ok", "error": None} for i, u in enumerate(utterances)]
            start += len(utterances)
            try:
                self._add_media(utterances, rows)
            except Exception as e:  # this dialogue's answer alone (a MediaError is a 422)
                out.append(e)
                continue
            out.append(rows)
        return out

    def _add_media(self, utterances: list[dict], rows: list[dict]) -> None:
        media = [i for i, u in enumerate(utterances) if u.get("video_b64") is not None or u.get("audio_b64") is not None]
        if media:
            with self._lock:
                done = self._run_media(utterances, media)
            for i, feats in done.items():
                feats.pop("text_embedding", None)
                rows[i].update(feats)

    def probe(self) -> None:
        """MiniLM on one fixed short utterance; ``RuntimeError`` unless a finite, non-zero 384-d vector comes back."""
        v = np.asarray(self.text.encode(["ok"]), dtype=np.float64)
        if v.shape != (1, 384) or not np.isfinite(v).all() or not np.linalg.norm(v) > 0:
            raise RuntimeError(f"Featurizer: the health probe's text embedding is not a finite non-zero 384-d vector "
                               f"(shape {v.shape})")


def b64(data: bytes) -> str:
    """Base64 text of ``data`` (what a client puts in ``video_b64``/``audio_b64``)."""
    return base64.b64encode(data).decode("ascii")
