"""Which stages run, with what resources, and the thin Ray wrapper around each.

A stage is a plain class: ``__init__`` loads, ``__call__(batch: dict) -> dict``
maps a batch of columns (lists) to new columns. :class:`ArrowStage` (one stage per actor pool) and
:class:`FusedStage` (all stages in one actor) are the only Ray-facing pieces: Arrow in, plain dicts to
the stages, Arrow out.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

import pyarrow as pa

from mer_ray.features.columns import to_table
from mer_ray.features.config import ExtractConfig, StageResources

#: Internal media columns, dropped as soon as no later stage needs them.
MEDIA_COLUMNS = ("_frames", "_frame_shape", "_audio", "_crops")


@dataclass
class StageSpec:
    """One pipeline stage: its class (as ``module:Name``), constructor kwargs and resources."""

    name: str
    cls: str
    kwargs: dict
    resources: StageResources
    needs: tuple[str, ...] = ()
    drop: tuple[str, ...] = field(default=())


def load_class(path: str):
    """``"pkg.module:Name"`` -> the class."""
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


class ArrowStage:
    """Ray Data actor: builds the stage once, then maps Arrow blocks through it."""

    def __init__(self, name: str, cls: str, kwargs: dict, drop: tuple[str, ...] = ()):
        self.name = name
        self.stage = load_class(cls)(**kwargs)
        self.drop = drop

    def __call__(self, table: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        out = to_table(self.stage(table.to_pydict()), base=table)
        out = out.drop_columns([c for c in self.drop if c in out.column_names])
        # Seconds this stage spent, spread over the block's rows; the driver sums them per stage.
        sec = (time.perf_counter() - t0) / max(1, table.num_rows)
        return out.append_column(f"_sec_{self.name}", pa.array([sec] * out.num_rows, pa.float64()))


class FusedStage:
    """Ray Data actor running several stages back to back in one process.

    The batch stays a Python dict between stages, so decoded frames and audio never go through Arrow or the
    object store, and a worker pays its start-up (imports, model loading) once for all stages. Per-stage
    seconds are still reported as ``_sec_<stage>`` columns.
    """

    def __init__(self, parts: list[tuple[str, str, dict]], drop: tuple[str, ...] = MEDIA_COLUMNS):
        self.parts = [(name, load_class(cls)(**kwargs)) for name, cls, kwargs in parts]
        self.drop = set(drop)

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = table.to_pydict()
        changed: set[str] = set()
        seconds = {}
        n = max(1, table.num_rows)
        for name, stage in self.parts:
            t0 = time.perf_counter()
            new = stage(batch)
            batch.update(new)
            changed.update(new)
            seconds[name] = (time.perf_counter() - t0) / n
        out = to_table({k: batch[k] for k in batch if k in changed and k not in self.drop}, base=table)
        out = out.drop_columns([c for c in self.drop if c in out.column_names])
        for name, sec in seconds.items():
            out = out.append_column(f"_sec_{name}", pa.array([sec] * out.num_rows, pa.float64()))
        return out


def _device(r: StageResources) -> str:
    """Encoders given GPUs run on CUDA."""
    return "cuda" if r.num_gpus > 0 else "cpu"


def build_stages(cfg: ExtractConfig, media_root: str | None, has_media: bool) -> list[StageSpec]:
    """The stages the config asks for, in order, with the media columns each can drop after it."""
    st: list[StageSpec] = []
    if has_media:
        st.append(StageSpec("decode", "mer_ray.features.decode:DecodeStage",
                            dict(media_root=media_root, n_frames=cfg.n_frames, max_width=cfg.max_width,
                                 sample_rate=cfg.sample_rate, max_seconds=cfg.max_seconds, threads=cfg.threads), cfg.decode))
        if cfg.faces:
            st.append(StageSpec("face", "mer_ray.features.faces:FaceStage", dict(min_size=cfg.face_min_size, threads=cfg.threads),
                                cfg.face, needs=("_frames", "_frame_shape")))
            st.append(StageSpec("expression", "mer_ray.features.expression:ExpressionStage",
                                dict(threads=cfg.threads, device=_device(cfg.expression)), cfg.expression, needs=("_crops",)))
        if cfg.image_model_dir:
            st.append(StageSpec("image", "mer_ray.features.image:ImageStage",
                                dict(model_dir=cfg.image_model_dir, threads=cfg.threads, device=_device(cfg.image)), cfg.image,
                                needs=("_frames", "_frame_shape")))
        if cfg.audio_encoder != "none":
            st.append(StageSpec("audio", "mer_ray.features.audio:AudioStage",
                                dict(encoder=cfg.audio_encoder, model_dir=cfg.audio_model_dir,
                                     sample_rate=cfg.sample_rate, threads=cfg.threads, device=_device(cfg.audio)), cfg.audio, needs=("_audio",)))
    if cfg.text:
        st.append(StageSpec("text", "mer_ray.features.text:TextStage",
                            dict(model_dir=cfg.text_model_dir, threads=cfg.threads, device=_device(cfg.text_stage)), cfg.text_stage))
    for i, s in enumerate(st):
        later = {c for t in st[i + 1:] for c in t.needs}
        s.drop = tuple(c for c in MEDIA_COLUMNS if c not in later)
    return st


def fuse_stages(stages: list[StageSpec], resources: StageResources) -> StageSpec:
    """One :class:`FusedStage` spec running ``stages`` in order (see ``ExtractConfig.fuse``)."""
    parts = [(s.name, s.cls, s.kwargs) for s in stages]
    return StageSpec("fused", "mer_ray.features.stages:FusedStage", {"parts": parts}, resources, drop=MEDIA_COLUMNS)
