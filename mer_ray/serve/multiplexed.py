"""Many fine-tuned adapters behind one endpoint: Serve's model multiplexing over :class:`AdapterHost`.

A request names its adapter with the ``serve_multiplexed_model_id`` header (Serve's own, so the
proxy and handles route it to a replica that already holds that adapter) or with a ``model`` field
in the body. Each replica keeps at most ``max_num_models_per_replica`` adapters (LRU, Serve's
multiplexer); an evicted adapter's LoRA weights are freed and reload identically on its next request.
Adapters live on storage every replica reads: ``<models>/mllm/adapters/<name>/``.

How the HTTP API uses it (:mod:`mer_ray.serve.ingress`; the rules are docs/serve.md's "Adapters"):

- a request that names an adapter is answered by that adapter alone, in the adapter's own label set
  (or a label set with a written-down mapping from it): the ensemble's members are trained on the base
  label set, so their distributions cannot be mixed with another set's;
- the adapter's temperature is applied as the ensemble's calibrated answers apply theirs
  (:func:`~mer_ray.calibration.temperature.apply_temperature` on the model's own labels, then the
  label-set projection); an adapter calibrated by ``mer calibrate-adapter`` also has conformal scores, and
  answers with prediction sets at the request's ``alpha`` (checked against its range by the Ingress); without
  them ``prediction_set``, ``alpha`` and ``conformal`` are null;
- in ``:batch`` each dialogue names its own adapter (a header names it for all); a session keeps the
  adapter it started with.
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from mer_ray.mllm.adapters import AdapterHost, UnknownAdapterError, list_adapters

#: Serve's multiplexing header (``ray.serve._private.constants.SERVE_MULTIPLEXED_MODEL_ID``).
HEADER = "serve_multiplexed_model_id"


class AdapterChoiceError(ValueError):
    """The request's adapter choice is invalid (answered with 422; the message says why)."""


def header_value(headers: dict[str, str] | None) -> str | None:
    """The :data:`HEADER` of a request's headers, matched as Serve's proxy matches it: case-insensitive, and
    ``-`` for ``_`` (proxies such as nginx rewrite underscores), so the Ingress and the router read the same name."""
    for k, v in (headers or {}).items():
        if k.lower().replace("-", "_") == HEADER:
            return v or None
    return None


def choose_adapter(header: str | None, body: str | None, known: dict[str, str] | None) -> str | None:
    """The adapter a request names (None: it names none), checked against ``known`` (``{name: label set}``).

    Args:
        known: the installed adapters; None when adapters are not enabled (then naming one is an error, not
            silently answered by the ensemble).

    Raises:
        AdapterChoiceError: adapters are not enabled, the header and the body disagree, or the name is not a
            known adapter.
    """
    header = header or None
    if known is None and (header or body):
        raise AdapterChoiceError(f"adapter {(header or body)[:80]!r} was asked for, but this deployment serves no "
                                 "adapters (adapters.enabled: false); leave out the model field and the "
                                 f"{HEADER} header to get the ensemble's answer")
    if header and body and header != body:
        raise AdapterChoiceError(f"the {HEADER} header names adapter {header[:80]!r} but the body's model field "
                                 f"names {body[:80]!r}; give one, or the same in both")
    name = header or body
    if name is not None and name not in known:
        raise AdapterChoiceError(str(UnknownAdapterError(name, sorted(known))))
    return name


def adapters_deployment(max_num_models_per_replica: int = 3):
    """The ``Adapters`` deployment class, with its LRU bound baked into ``@serve.multiplexed`` (read from config)."""

    @serve.deployment(name="Adapters", ray_actor_options={"num_cpus": 1})
    class Adapters:
        """Fine-tuned adapters (``<models>/mllm/adapters/<name>``) on one shared base LLM."""

        def __init__(self, models_dir: str, threads: int = 1, batch_size: int = 4):
            from mer_ray.serve.members import _threads

            _threads(threads)
            self.host = AdapterHost(models_dir, batch_size=batch_size)
            self.models_dir = models_dir

        @serve.multiplexed(max_num_models_per_replica=max_num_models_per_replica)
        async def get_adapter(self, name: str):
            return await asyncio.to_thread(self.host.load, name)  # loading takes seconds: keep the loop free

        def known(self) -> dict[str, str]:
            return list_adapters(self.models_dir)

        def loaded(self) -> list[str]:
            """Adapters loaded in this replica, for tests and the bench (peft names carry a load counter)."""
            stale = set(self.host.stale)
            return sorted(n.rsplit("-", 1)[0] for n in getattr(self.host.lm, "peft_config", {}) if n not in stale)

        async def predict(self, rows: list[dict], label_set: str | None = None, alpha: float | None = None) -> dict:
            """One dialogue's rows -> ``{adapter, label_set, labels, probs [n, C] uncalibrated, temperature, sets}``.

            ``sets``: :meth:`~mer_ray.mllm.adapters.LoadedAdapter.set_rule` for the answer's label set (``label_set``,
            None: the adapter's own) at ``alpha`` (already checked by the Ingress), or None without conformal scores.
            """
            from mer_ray.serve.ensemble import label_map

            adapter = await self.get_adapter(serve.get_multiplexed_model_id())
            probs = await asyncio.to_thread(adapter.predict, rows, False)
            return {"adapter": adapter.name, "label_set": adapter.label_set, "labels": adapter.labels,
                    "probs": probs, "temperature": adapter.temperature, "calibrated": adapter.calibration is not None,
                    "sets": adapter.set_rule(label_map(adapter.label_set, label_set)[0], alpha)}

    return Adapters


def adapter_answer(out: dict, label_set: str | None, targets: list[int] | None, timing: dict[str, float]) -> dict:
    """An :class:`Adapters` ``predict`` result -> the response dict of ``/v1/recognize`` (one ``utterances`` entry
    per target row), answered by the adapter alone.

    The temperature is applied on the adapter's own labels, then the answer is projected onto ``label_set``
    (None: the adapter's own), as :class:`~mer_ray.serve.ensemble.Ensemble` does for its calibrated answers.
    The member fields (``vanilla``, ``llm``, ``mllm``) are null: no ensemble member answered.

    Raises:
        LabelSetError: no written-down mapping from the adapter's label set to ``label_set``.
    """
    from mer_ray.calibration.conformal import prediction_set
    from mer_ray.calibration.temperature import apply_temperature
    from mer_ray.serve.ensemble import as_dist, label_map, project_rows

    name, labels, proj = label_map(out["label_set"], label_set)
    raw = np.asarray(out["probs"], dtype=np.float64)
    raw = raw if targets is None else raw[targets]
    t = float(out.get("temperature", 1.0))
    probs = project_rows(raw if t == 1.0 else apply_temperature(raw, t), proj)
    rule = out.get("sets")  # made for label set ``name``, so its thresholds are in ``labels``' order
    utts = []
    for p, r in zip(probs, project_rows(raw, proj)):
        d = as_dist(p, labels)
        sets = None if rule is None else prediction_set(p, np.asarray(rule["thresholds"]), labels)
        utts.append({"label": max(d, key=d.get), "probs": d, "probs_uncalibrated": as_dist(r, labels), "prediction_set": sets,
                     "vanilla": None, "llm": None, "receptive_fields": [], "mllm": None})
    conformal = None if rule is None else {"method": rule["method"], "alpha_range": rule["alpha_range"]}
    return {"label_set": name, "labels": labels, "model": out["adapter"], "utterances": utts,
            "calibrated": bool(out.get("calibrated", False)), "alpha": None if rule is None else rule["alpha"],
            "conformal": conformal, "timing_ms": timing}
