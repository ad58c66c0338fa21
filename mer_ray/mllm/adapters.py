"""Named fine-tuned adapters on one base LLM: ``<models>/mllm/adapters/<name>/``, each a fine-tuned directory.

An adapter directory is what ``mer finetune`` writes (see :mod:`mer_ray.mllm.artifacts`) plus,
optionally, its own ``calibration.json`` (``mer calibrate-adapter``: a temperature and conformal scores for
distribution ``mllm``, fitted on the adapter's dev predictions).
Each carries its own label set, so one endpoint can serve a call-centre adapter and a
TV-dialogue adapter side by side.

:class:`AdapterHost` loads the base LLM once and puts each adapter's LoRA weights into the
same peft model under the adapter's name; only the LoRA matrices and projectors are per
adapter. Serve's ``@serve.multiplexed`` decides which adapters stay loaded (LRU) and calls
:meth:`LoadedAdapter.__del__` on eviction, which deletes that adapter's weights again.
Plain PyTorch and peft: no Ray here.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from mer_ray.mllm.artifacts import ARTIFACT_FILES, META_FILE, read_meta

#: Adapter names: a URL-, header- and path-safe token (it becomes a directory and a peft adapter name).
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class UnknownAdapterError(KeyError):
    """A request named an adapter this models directory does not have (the message lists those it has)."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name, self.known = name, known

    def __str__(self) -> str:
        return f"unknown adapter {self.name[:80]!r}; known adapters: {self.known}"


def adapters_root(models_dir: str | Path) -> Path:
    """``<models>/mllm/adapters``."""
    return Path(models_dir) / "mllm" / "adapters"


def check_name(name: str) -> str:
    """``name`` if it is a valid adapter name, else ValueError naming the rule."""
    if not NAME.match(name or ""):
        raise ValueError(f"adapter name {name[:80]!r} must match {NAME.pattern} (lower case, digits, '_' and '-')")
    return name


def list_adapters(models_dir: str | Path) -> dict[str, str]:
    """``{name: label set}`` of every adapter directory under :func:`adapters_root` (sorted by name)."""
    root = adapters_root(models_dir)
    if not root.is_dir():
        return {}
    return {p.name: read_meta(p)["label_set"] for p in sorted(root.iterdir())
            if p.is_dir() and NAME.match(p.name) and (p / META_FILE).exists()}


def install_adapter(src: str | Path, models_dir: str | Path, name: str, overwrite: bool = False) -> Path:
    """Copy the fine-tuned directory ``src`` to ``<models>/mllm/adapters/<name>/`` (atomically: a reader sees
    the old adapter or the new one, never half of one).

    Raises:
        FileExistsError: the adapter exists and ``overwrite`` is False.
        FileNotFoundError: ``src`` is not a fine-tuned directory.
    """
    read_meta(src)  # a clear error if src is not one
    dest = adapters_root(models_dir) / check_name(name)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"adapter {name!r} already exists at {dest} (pass overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=lambda d, names: [] if Path(d) != Path(src) else [n for n in names if n not in ARTIFACT_FILES])
    old = dest.parent / f".{name}.old{os.getpid()}"
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


class LoadedAdapter:
    """One adapter, loaded into its host's shared LLM: ``predict(rows, features) -> [n, C]`` in its label set.

    Attributes:
        name, label_set, labels: the adapter and its label set.
        temperature: of its ``calibration.json`` (distribution ``mllm``), 1.0 without one.
        calibration: that file's :class:`~mer_ray.calibration.artifacts.Calibration`, or None.
    """

    def __init__(self, host: AdapterHost, name: str, predictor, peft_name: str | None, calibration):
        self.host, self.name, self.predictor, self.peft_name = host, name, predictor, peft_name
        self.label_set, self.labels = predictor.label_set, list(predictor.labels)
        self.calibration = calibration
        self.temperature = float((calibration.temperatures if calibration else {}).get("mllm", 1.0))
        self.columns = host.columns_of(name)

    def predict(self, rows: list[dict], calibrated: bool = True) -> np.ndarray:
        """Rows of one dialogue (``speaker``, ``text``, feature columns) -> ``[n, C]`` probabilities.

        Args:
            calibrated: apply the adapter's temperature (1.0 leaves the distribution as it is).
        """
        feats = [{m: r.get(c) for m, c in self.columns.items() if r.get(c) is not None} for r in rows]
        with self.host.active(self):
            p = np.asarray(self.predictor.predict_dialogue(rows, feats)["emotion_probs"], dtype=np.float64)
        if calibrated and self.temperature != 1.0:
            from mer_ray.calibration.temperature import apply_temperature

            p = apply_temperature(p, self.temperature)
        return p

    def set_rule(self, label_set: str, alpha: float | None = None) -> dict | None:
        """What this adapter's conformal prediction sets in ``label_set`` need, from its ``calibration.json``.

        Returns:
            ``{thresholds: [C'], labels: [C'], alpha, method, alpha_range}`` (``label_set``'s label order), or
            None when the adapter has no conformal scores for ``label_set`` (then it gives no sets).

        Raises:
            ValueError: ``alpha`` is outside the calibration's range.
        """
        cal = self.calibration
        q = None if cal is None else cal.thresholds("mllm", label_set, alpha)
        if q is None:
            return None
        return {"thresholds": q.tolist(), "labels": list(cal.conformal["mllm"][label_set].labels),
                "alpha": cal.alpha_default if alpha is None else float(alpha), "method": cal.method,
                "alpha_range": list(cal.alpha_range)}

    def __del__(self):  # Serve's multiplexer calls this on LRU eviction
        host = self.__dict__.pop("host", None)
        if host is not None:
            host.unload(self.peft_name)


class AdapterHost:
    """The base LLM shared by every adapter of a models directory.

    Args:
        models_dir: holds ``mllm/adapters/<name>/``.
        batch_size: prompts per forward pass.
        base: the base model (default: the one the first loaded adapter was trained on); every adapter
            must have been trained on it.
    """

    def __init__(self, models_dir: str | Path, batch_size: int = 4, base: str | None = None):
        self.models_dir, self.batch_size, self.base = Path(models_dir), batch_size, base
        self.lm = self.tok = None
        self.dtype: str | None = None
        # peft adapters no LoadedAdapter uses any more. A deque, and only appended to by unload(): __del__ runs
        # whenever the garbage collector fires, even inside peft's own loops over the model's modules on this
        # thread, so it must never change the model; the weights are deleted at the next load, at a safe point.
        self.stale: deque[str] = deque()
        self._n = 0
        self.lock = threading.RLock()  # one forward pass at a time: the active adapter is state of the shared model

    def known(self) -> dict[str, str]:
        """``{name: label set}``, read from disk each time (adapters may be added on shared storage)."""
        return list_adapters(self.models_dir)

    def columns_of(self, name: str) -> dict[str, str]:
        """Modality -> feature-store column of the adapter's projectors."""
        projectors = (read_meta(adapters_root(self.models_dir) / name).get("model") or {}).get("projectors") or {}
        return {m: p["feature"] for m, p in projectors.items() if isinstance(p, dict) and p.get("feature")}

    def load(self, name: str) -> LoadedAdapter:
        """Load adapter ``name`` (its LoRA into the shared model, its projectors and calibration).

        Raises:
            UnknownAdapterError: no such adapter directory.
            ValueError: the adapter was trained on another base model than this host's.
        """
        from mer_ray.calibration.artifacts import Calibration
        from mer_ray.mllm.artifacts import load_projectors
        from mer_ray.mllm.build import ModelConfig, load_causal_lm
        from mer_ray.mllm.config import PromptConfig
        from mer_ray.mllm.model import MultimodalLM
        from mer_ray.mllm.predict import MLLMPredictor

        known = self.known()
        if name not in known:
            raise UnknownAdapterError(name, sorted(known))
        d = adapters_root(self.models_dir) / name
        meta = read_meta(d)
        cfg = ModelConfig(**{**meta["model"], "lora": None})
        with self.lock:
            if self.lm is None:
                self.base, self.dtype = self.base or cfg.base, cfg.dtype
                self.lm, self.tok = load_causal_lm(self.base, self.dtype)
            if (cfg.base, cfg.dtype) != (self.base, self.dtype):
                raise ValueError(f"adapter {name!r} was trained on {cfg.base} ({cfg.dtype}); this endpoint's base is "
                                 f"{self.base} ({self.dtype})")
            peft_name = None
            if (d / "adapter").exists():
                # a fresh peft name per load: a reload never collides with weights peft still holds
                self._n += 1
                peft_name = f"{name}-{self._n}"
                if hasattr(self.lm, "peft_config"):
                    self.lm.load_adapter(str(d / "adapter"), adapter_name=peft_name)
                else:
                    from peft import PeftModel

                    self.lm = PeftModel.from_pretrained(self.lm, str(d / "adapter"), adapter_name=peft_name)
                self.lm.requires_grad_(False)
                self._drop_stale()
            model = MultimodalLM(self.lm, load_projectors(d, cfg, self.lm)).eval()
            predictor = MLLMPredictor(model, self.tok, tuple(meta["labels"]), PromptConfig(**meta["prompt"]), meta["shots"],
                                      self.batch_size, meta["label_set"])
        return LoadedAdapter(self, name, predictor, peft_name, Calibration.load(d))

    @contextmanager
    def active(self, adapter: LoadedAdapter):
        """A context in which the shared model computes with ``adapter``'s LoRA (or none, for a projector-only one)."""
        with self.lock:
            ctx = nullcontext()
            if adapter.peft_name:
                self.lm.set_adapter(adapter.peft_name)
            elif hasattr(self.lm, "disable_adapter"):
                ctx = self.lm.disable_adapter()  # LoRA layers were injected in place: switch them off
            with ctx:
                yield

    def unload(self, peft_name: str | None) -> None:
        """Mark one loaded adapter's LoRA weights free (None: a projector-only adapter, nothing to free).

        Safe from ``__del__`` at any instant: it only appends to a deque; :meth:`load` deletes the weights.
        """
        if peft_name:
            self.stale.append(peft_name)

    def _drop_stale(self) -> None:
        # peft cannot delete its last adapter (the model would have none); that one waits for the next load
        keep = []
        while self.stale:
            n = self.stale.popleft()
            if n in self.lm.peft_config and len(self.lm.peft_config) > 1:
                self.lm.delete_adapter(n)
            elif n in self.lm.peft_config:
                keep.append(n)
        self.stale.extend(keep)
