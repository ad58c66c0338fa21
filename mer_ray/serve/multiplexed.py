"""Many fine-tuned adapters behind one endpoint: Serve's model multiplexing over :class:`AdapterHost`.

A request names its adapter with the ``serve_multiplexed_model_id`` header (Serve's own, so the
proxy and handles route it to a replica that already holds that adapter) or with a ``model`` field
in the body. Each replica keeps at most ``max_num_models_per_replica`` adapters (LRU, Serve's
multiplexer); an evicted adapter's LoRA weights are freed and reload identically on its next request.
Adapters live on storage every replica reads: ``<models>/mllm/adapters/<name>/``.
"""

from __future__ import annotations

import asyncio

from ray import serve

from mer_ray.mllm.adapters import AdapterHost, UnknownAdapterError, list_adapters

#: Serve's multiplexing header (``ray.serve._private.constants.SERVE_MULTIPLEXED_MODEL_ID``).
HEADER = "serve_multiplexed_model_id"


class AdapterChoiceError(ValueError):
    """The request's adapter choice is invalid (answered with 422; the message says why)."""


def choose_adapter(header: str | None, body: str | None, known: dict[str, str]) -> str | None:
    """The adapter a request names (None: it names none), checked against ``known`` (``{name: label set}``).

    Raises:
        AdapterChoiceError: the header and the body disagree, or the name is not a known adapter.
    """
    header = header or None
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

        async def predict(self, rows: list[dict]) -> dict:
            """One dialogue's rows -> ``{adapter, label_set, labels, probs [n, C] uncalibrated, temperature}``."""
            adapter = await self.get_adapter(serve.get_multiplexed_model_id())
            probs = await asyncio.to_thread(adapter.predict, rows, False)
            return {"adapter": adapter.name, "label_set": adapter.label_set, "labels": adapter.labels,
                    "probs": probs, "temperature": adapter.temperature}

    return Adapters
