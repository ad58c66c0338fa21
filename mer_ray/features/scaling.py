"""Robust standardisation of frozen features: fitted once on train, stored with the model, applied in torch.

Real features have wildly different scales (eGeMAPS columns have standard
deviations from 0.01 to ~200 and means up to thousands), and a network fed
them raw learns from the few largest columns only. Each model that reads a
frozen feature therefore holds a :class:`FeatureScaler`: ``clip((x - center) /
scale, -clip, clip)`` with ``center`` the train median and ``scale`` the
train IQR / 1.349 (the standard deviation for normal data), from
scikit-learn's ``RobustScaler``. Clipping keeps one outlying clip from
saturating the first layer. The statistics are buffers, so they are saved
with the weights and every path that loads the model (``mer predict``, Serve,
FARCER's projectors) applies the same numbers.

Missing features are never scaled into data: rows where a feature is absent
are excluded from fitting, and the models replace them with a learned
missing vector after scaling.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

#: z-scores beyond this are clipped (about 1 in 1.7 million for normal data).
CLIP = 5.0


def fit_scaling(x: np.ndarray, clip: float = CLIP) -> dict[str, list[float] | float]:
    """Robust per-column statistics of the present rows of a feature.

    Args:
        x: ``[N, D]`` float features of the train split; rows with any NaN (missing) are ignored.
        clip: bound of the scaled values.

    Returns:
        ``{"center": [D], "scale": [D], "clip": float, "n": rows used}``. A column whose IQR is 0
        (mostly constant) falls back to its standard deviation, and a constant one to 1.
    """
    from sklearn.preprocessing import RobustScaler

    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"fit_scaling expects [N, D] features, got shape {x.shape}")
    x = x[~np.isnan(x).any(axis=1)]
    if len(x) == 0:
        d = x.shape[1]
        return {"center": [0.0] * d, "scale": [1.0] * d, "clip": float(clip), "n": 0}
    rs = RobustScaler(unit_variance=True).fit(x)
    iqr = np.subtract(*np.percentile(x, [75, 25], axis=0))
    std = x.std(axis=0)
    scale = np.where(iqr > 0, rs.scale_, np.where(std > 0, std, 1.0))
    return {"center": rs.center_.astype(np.float32).tolist(), "scale": scale.astype(np.float32).tolist(),
            "clip": float(clip), "n": int(len(x))}


def fit_present(rows: list[np.ndarray], dim: int, clip: float = CLIP) -> dict[str, list[float] | float]:
    """:func:`fit_scaling` over the present rows of one feature, gathered from many utterances or dialogues.

    Args:
        rows: arrays of ``[D]`` (one utterance) or ``[n, D]`` (several); missing rows already left out.
        dim: D, used when ``rows`` is empty (the identity statistics of width D).
    """
    x = np.concatenate([np.asarray(r, dtype=np.float64).reshape(-1, dim) for r in rows]) if rows else np.zeros((0, dim))
    return fit_scaling(x, clip)


class FeatureScaler(nn.Module):
    """``clip((x - center) / scale)`` per column; identity until :meth:`set_stats` is called.

    Args:
        dim: feature width D.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(dim, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(dim, dtype=torch.float32))
        self.register_buffer("clip", torch.tensor(float("inf"), dtype=torch.float32))

    def set_stats(self, stats: dict) -> FeatureScaler:
        """Load statistics from :func:`fit_scaling` (or a model's JSON); returns self."""
        center = torch.as_tensor(stats["center"], dtype=torch.float32)
        if center.shape != self.center.shape:
            raise ValueError(f"scaling statistics have width {tuple(center.shape)}; the feature has {tuple(self.center.shape)}")
        self.center.copy_(center)
        self.scale.copy_(torch.as_tensor(stats["scale"], dtype=torch.float32))
        self.clip.fill_(float(stats.get("clip", CLIP)))
        return self

    def stats(self) -> dict:
        """The statistics as JSON-able lists (what the artifacts' JSON records)."""
        return {"center": self.center.tolist(), "scale": self.scale.tolist(), "clip": float(self.clip)}

    def _apply(self, fn, recurse=True):
        # ``model.to(torch.bfloat16)`` would round a median of 2,700 to 2,688: keep the statistics
        # float32 (on whatever device) whatever dtype the rest of the model takes.
        saved = {k: b for k, b in self._buffers.items()}
        out = super()._apply(fn, recurse)
        for k, old in saved.items():
            new = self._buffers[k]
            if new.dtype != torch.float32:
                self._buffers[k] = old.to(device=new.device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` features -> ``[..., D]`` scaled features, in float32 or ``x``'s dtype if wider."""
        dt = torch.promote_types(x.dtype, torch.float32)
        z = (x.to(dt) - self.center.to(dt)) / self.scale.to(dt)
        return z.clamp(-float(self.clip), float(self.clip))
