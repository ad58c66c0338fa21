"""The FastAPI ingress deployment: HTTP in, ``DeploymentHandle`` calls to the members out.

Every request is checked in this order (``mer_ray/serve/http.py``): API key (401)
-> body size (413, before the body is read when Content-Length says so) -> JSON
syntax (422) -> schema, unknown fields included (422) -> configured limits (422
for text length and counts, 413 for one media upload) -> adapter choice (422) -> label set (422).

A request naming a fine-tuned adapter (``serve_multiplexed_model_id`` header or ``model`` field) is
answered by the ``Adapters`` deployment alone (:mod:`mer_ray.serve.multiplexed`); every other request
by the ensemble, exactly as without adapters.
"""

# No `from __future__ import annotations`: Serve's class-based view needs real annotations (Request).
import asyncio
import logging
import mimetypes
import os
import re
import time
from importlib.resources import files

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from mer_ray.calibration.artifacts import Calibration
from mer_ray.data.labels import LABEL_SETS
from mer_ray.serve import schemas as S
from mer_ray.serve.config import ServeConfig
from mer_ray.serve.ensemble import AlphaError, Ensemble, LabelSetError, available_label_sets, label_map
from mer_ray.serve.featurize import MediaError
from mer_ray.serve.http import ApiError, api, body_spec, check_auth, check_limits, check_sid, error_response, parse, read_body, transient_errors, unavailable
from mer_ray.serve.multiplexed import AdapterChoiceError, adapter_answer, choose_adapter, header_value
from mer_ray.serve.session_stores import open_store
from mer_ray.serve.sessions import AdapterConflict, SessionConflict, speaker_summary, turn_key

#: A file name under ``static/``: no separator, no leading dot (so no ``..``), nothing a path could smuggle.
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


#: Attempts of one request's stage calls when a stage replica dies or is replaced, and the first backoff (doubled
#: after each): a retry after 0.25 s reaches another replica (Serve's router drops a replica whose call raised
#: ActorDiedError); with a single replica, 1.75 s of retries end in a 503 with Retry-After.
ATTEMPTS, BACKOFF_S = 4, 0.25
#: Seconds the Ingress keeps its list of installed adapters: an adapter copied to shared storage is served within
#: this, without a directory scan (a file read per adapter, slow on NFS) on every request.
ADAPTERS_TTL_S = 5.0
_log = logging.getLogger("ray.serve")


class _Store:
    """The session store (:func:`~mer_ray.serve.session_stores.open_store`), opened on first use, called off the event loop."""

    def __init__(self, cfg, models_dir: str | None = None):
        self.cfg, self.models_dir, self._store = cfg, models_dir, None

    async def __call__(self, method: str, *args):
        if self._store is None:
            self._store = open_store(self.cfg, self.models_dir)
        return await asyncio.to_thread(getattr(self._store, method), *args)  # SQLite waits on a lock, Redis on the network


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """Routes; the members are ``DeploymentHandle``s bound by :func:`mer_ray.serve.builder.build_app`."""

    def __init__(self, cfg: dict, featurizer, vanilla, refiner=None, fusion=None, mllm=None, members: dict | None = None,
                 ensemble_fusion=None, adapters=None):
        self.cfg = ServeConfig.model_validate(cfg)
        self.api_key = None
        if self.cfg.api_key_env:
            self.api_key = os.environ.get(self.cfg.api_key_env)
            if not self.api_key:
                raise RuntimeError(f"api_key_env is {self.cfg.api_key_env!r} but that environment variable is unset or empty")
        self.ens = Ensemble(featurizer.featurize.remote, vanilla.predict.remote, vanilla.label_set_name.remote,
                            refiner.refine.remote if refiner else None, fusion.fuse.remote if fusion else None,
                            mllm.predict.remote if mllm else None,
                            members=None if members is None else {m: h.predict.remote for m, h in members.items()},
                            ensemble_fuse=ensemble_fusion.fuse.remote if ensemble_fusion else None,
                            calibration=Calibration.load(self.cfg.models_dir),
                            # co-located: `featurizer` and `vanilla` are one FeaturizerVanilla, asked once per dialogue
                            featurize_vanilla=featurizer.featurize_predict.remote if self.cfg.layout == "colocated" else None)
        self.store = _Store(self.cfg.sessions)
        self.adapters = adapters  # the Adapters deployment (adapters.enabled), else None
        self._known, self._known_at = {}, -ADAPTERS_TTL_S
        self._adapter_cals: dict = {}  # name -> its Calibration or None, read once per ADAPTERS_TTL_S

    def known_adapters(self) -> dict[str, str] | None:
        """``{name: label set}`` of the installed adapters (re-read every :data:`ADAPTERS_TTL_S`); None: not enabled."""
        if self.adapters is None:
            return None
        if time.monotonic() - self._known_at >= ADAPTERS_TTL_S:
            from mer_ray.mllm.adapters import list_adapters

            self._known, self._known_at = list_adapters(self.cfg.models_dir), time.monotonic()
            self._adapter_cals = {}
        return self._known

    def _check_adapter_alpha(self, adapter: str, alpha: float | None) -> None:
        """422 (AlphaError) when ``adapter`` has conformal scores and ``alpha`` is outside their range; an adapter
        without them ignores ``alpha`` (its answer says ``alpha: null``), as an uncalibrated ensemble does."""
        if alpha is None:
            return
        if adapter not in self._adapter_cals:
            from mer_ray.calibration.artifacts import Calibration
            from mer_ray.mllm.adapters import adapters_root

            self._adapter_cals[adapter] = Calibration.load(adapters_root(self.cfg.models_dir) / adapter)
        cal = self._adapter_cals[adapter]
        if cal is not None and cal.conformal.get("mllm"):
            try:
                cal.check_alpha(float(alpha))
            except ValueError as e:
                raise AlphaError(f"adapter {adapter!r}: {e}") from None

    def _choose(self, body: str | None, header: str | None, where: str = "") -> str | None:
        """The adapter a request names (None: the ensemble answers); 422 saying why a choice is refused."""
        try:
            return choose_adapter(header, body, self.known_adapters())
        except AdapterChoiceError as e:
            raise ApiError(422, f"{where}{e}") from None

    async def _options(self, req, where: str = "", adapter: str | None = None) -> tuple[str | None, bool]:
        """Check a request's label set and alpha (422 naming them); the label set and the effective ``use_llm``.

        With ``adapter`` the label set is checked against the adapter's own, and ``alpha`` against the adapter's
        calibration (if it has conformal scores); ``use_llm`` does not apply (an adapter has no LLM refiner).
        """
        if adapter is not None:
            self._choose(adapter, None, where)  # still installed: the list may have been re-read since the choice
            try:
                label_map(self.known_adapters()[adapter], req.label_set)
            except LabelSetError as e:
                raise ApiError(422, f"{where}adapter {adapter!r}: {e}") from None
            try:
                self._check_adapter_alpha(adapter, req.alpha)
            except AlphaError as e:
                raise ApiError(422, f"{where}{e}") from None
            return req.label_set, False
        try:
            label_map(await self._run(self.ens.model_label_set), req.label_set)
            self.ens.resolve_alpha(req.alpha)
        except (LabelSetError, AlphaError) as e:
            raise ApiError(422, f"{where}{e}") from None
        return req.label_set, req.use_llm and self.ens.has_llm

    async def _run(self, make):
        """``await make()``, retried on a transient failure (a stage replica dying): 503 with Retry-After when they run out.

        Safe because every stage is a pure function of its input and nothing here writes a session.
        """
        for attempt in range(ATTEMPTS):
            try:
                return await make()
            except MediaError as e:
                raise ApiError(422, str(e)) from None
            except transient_errors() as e:
                if attempt == ATTEMPTS - 1:
                    _log.warning("stage call failed %d times, answering 503", ATTEMPTS, exc_info=e)
                    raise unavailable(e) from e
                await asyncio.sleep(BACKOFF_S * 2**attempt)

    async def _session(self, method: str, *args):
        if self.store.models_dir is None:
            self.store.models_dir = self.cfg.models_dir  # the default SQLite folder sits beside the models
        return await self.store(method, *args)

    @api.get("/", include_in_schema=False)
    async def index(self) -> HTMLResponse:
        from mer_ray.serve.page import index_html

        return HTMLResponse(index_html())

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> Response:
        """A file of the package's ``static/`` folder (the page's assets); 404 for any other name."""
        path = files("mer_ray.serve") / "static" / name if _STATIC_NAME.match(name) else None
        if path is None or not path.is_file():
            raise ApiError(404, f"no static file {name[:80]!r}")
        return Response(path.read_bytes(), media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_label_set": await self.ens.model_label_set(), "llm": self.ens.has_llm,
                "mllm": self.ens.mllm is not None, "ensemble_members": sorted(self.ens.members or [])}

    @api.get("/v1/labels", response_model=S.LabelsResponse)
    async def labels(self) -> S.LabelsResponse:
        m = await self.ens.model_label_set()
        return S.LabelsResponse(model_label_set=m, label_sets={k: list(v.labels) for k, v in LABEL_SETS.items()},
                                available=available_label_sets(m), adapters=self.known_adapters() or {})

    async def _recognize(self, req: S.RecognizeRequest, adapter: str | None = None) -> dict:
        label_set, use_llm = await self._options(req, adapter=adapter)
        utts = [u.model_dump() for u in req.utterances]
        if adapter is None:
            out = await self._run(lambda: self.ens.recognize(utts, use_llm, label_set, req.alpha))
        else:
            t0, timing = time.perf_counter(), {}
            rows = await self._run(lambda: self.ens.featurize(utts))
            timing["features"] = (time.perf_counter() - t0) * 1e3
            out = await self._adapter_rows(adapter, rows, label_set, None, timing, req.alpha)
            timing["total"] = (time.perf_counter() - t0) * 1e3
        return S.RecognizeResponse.model_validate(out).model_dump()

    async def _adapter_rows(self, adapter: str, rows: list[dict], label_set: str | None, targets: list[int] | None,
                            timing: dict[str, float], alpha: float | None = None) -> dict:
        """Featurized rows answered by ``adapter`` alone (Serve routes to a replica that holds it, else loads it)."""
        t = time.perf_counter()
        handle = self.adapters.options(multiplexed_model_id=adapter)
        out = await self._run(lambda: handle.predict.remote(rows, label_set, alpha))
        timing["adapter"] = (time.perf_counter() - t) * 1e3
        return adapter_answer(out, label_set, targets, timing)

    async def call(self, route: str, body: bytes, headers: dict | None = None, session_id: str | None = None) -> tuple[int, dict]:
        """One POST request without the HTTP transport: ``(status, JSON body)``.

        ``route`` is ``recognize``, ``batch`` or ``turn``. The HTTP routes call this after reading
        the body; tests call it through a ``DeploymentHandle`` in local testing mode.
        """
        try:
            check_auth({k.lower(): v for k, v in (headers or {}).items()}, self.api_key)
            header = header_value(headers)
            if route == "recognize":
                req = parse(body, S.RecognizeRequest, self.cfg.max_body_bytes)
                check_limits(req, self.cfg)
                return 200, await self._recognize(req, self._choose(req.model, header))
            if route == "batch":
                return 200, await self._batch(parse(body, S.BatchRequest, self.cfg.max_body_bytes), header)
            if route == "turn":
                check_sid(session_id or "")
                return 200, await self._turn(session_id, parse(body, S.TurnRequest, self.cfg.max_body_bytes), header)
            raise ApiError(404, f"unknown route {route!r}")
        except ApiError as e:
            return e.status, e.body()
        except SessionConflict as e:
            return 409, {"error": e.message, "detail": [], "next_turn": e.next_turn}
        except AdapterConflict as e:  # raised by the store, inside the append's transaction
            return 422, {"error": str(e), "detail": []}
        except transient_errors() as e:  # the session store locked or unreachable past its timeout
            _log.warning("transient failure, answering 503", exc_info=e)
            return 503, unavailable(e).body()
        except Exception as e:  # a bug: still a JSON body that names it, never a bare 500
            _log.exception("unexpected error, answering 500")
            return 500, {"error": f"internal error: {type(e).__name__}: {str(e)[:200]}", "detail": []}

    async def _batch(self, req: S.BatchRequest, header: str | None) -> dict:
        """Every dialogue checked first (the whole request is a 422 naming ``dialogues[k]``, as for any other bad
        item), then all answered concurrently, each by its own adapter or the ensemble; a header names the adapter
        of every dialogue, and a dialogue whose ``model`` disagrees with it is such a 422."""
        if len(req.dialogues) > self.cfg.max_dialogues:
            raise ApiError(422, f"dialogues: {len(req.dialogues)} dialogues is over the limit of {self.cfg.max_dialogues}")
        adapters = []
        for k, d in enumerate(req.dialogues):
            check_limits(d, self.cfg, where=f"dialogues[{k}].")
            adapters.append(self._choose(d.model, header, where=f"dialogues[{k}]: "))
            await self._options(d, where=f"dialogues[{k}]: ", adapter=adapters[-1])
        return {"results": await asyncio.gather(*(self._recognize(d, a) for d, a in zip(req.dialogues, adapters)))}

    async def _turn_adapter(self, session_id: str, req: S.TurnRequest, header: str | None) -> str | None:
        """The adapter a turn is answered by: the one it names, else its session's (the store refuses a change)."""
        adapter = self._choose(req.model, header)
        if adapter is None and self.adapters is not None:
            adapter = await self._session("adapter", session_id)
            if adapter is not None and adapter not in self.known_adapters():
                raise ApiError(422, f"session {session_id!r} is answered by adapter {adapter!r}, which is no longer installed "
                                    f"(known adapters: {sorted(self.known_adapters())}); start a new session")
        return adapter

    async def _turn(self, session_id: str, req: S.TurnRequest, header: str | None = None) -> dict:
        check_limits(req, self.cfg)
        adapter = await self._turn_adapter(session_id, req, header)
        label_set, use_llm = await self._options(req, adapter=adapter)
        key = turn_key(req.model_dump(), adapter)
        t0 = time.perf_counter()
        timing: dict[str, float] = {}
        # a retried request (expected_turn already stored, same key) is answered from the store, before any work
        got = await self._session("append", session_id, None, req.expected_turn, key, adapter)
        if got is None:
            row = (await self._run(lambda: self.ens.featurize([req.utterance.model_dump()])))[0]
            timing["features"] = (time.perf_counter() - t0) * 1e3
            got = await self._session("append", session_id, row, req.expected_turn, key, adapter)  # atomic: the whole turn or none
        turn, kept, answer = got
        if answer is not None:
            return answer
        # the model's context: the kept turns' features, numbered by position (earlier answers stay in the store)
        rows = [{**{k: v for k, v in r.items() if k != "prediction"}, "turn": k} for k, r in enumerate(kept)]
        if adapter is None:
            out = await self._run(lambda: self.ens.predict_rows(rows, use_llm, label_set, targets=[len(rows) - 1], timing=timing,
                                                                alpha=req.alpha))
        else:
            out = await self._adapter_rows(adapter, rows, label_set, [len(rows) - 1], timing, req.alpha)
        u = out["utterances"][0]
        pred = {"turn": turn, "label_set": out["label_set"], "label": u["label"], "probs": u["probs"]}
        speakers = speaker_summary([*kept[:-1], {**kept[-1], "prediction": pred}], out["label_set"])
        timing["total"] = (time.perf_counter() - t0) * 1e3
        answer = S.TurnResponse.model_validate({
            "session_id": session_id, "turn": turn, "n_context": len(rows), "speakers": speakers, "utterance": u, "timing_ms": timing,
            "model": adapter, **{k: out[k] for k in ("label_set", "labels", "calibrated", "alpha", "conformal")}}).model_dump()
        await self._session("annotate", session_id, turn, pred, answer)  # a retry of this turn now gets this answer
        return answer

    async def _http(self, request: Request, route: str, session_id: str | None = None) -> JSONResponse:
        check_auth(request.headers, self.api_key)  # before reading a body
        body = await read_body(request, self.cfg.max_body_bytes)
        status, payload = await self.call(route, body, dict(request.headers), session_id)
        return JSONResponse(payload) if status == 200 else error_response(status, payload)

    @api.post("/v1/recognize", response_model=S.RecognizeResponse, openapi_extra=body_spec(S.RecognizeRequest))
    async def recognize(self, request: Request):
        return await self._http(request, "recognize")

    @api.post("/v1/recognize:batch", response_model=S.BatchResponse, openapi_extra=body_spec(S.BatchRequest))
    async def recognize_batch(self, request: Request):
        return await self._http(request, "batch")

    @api.post("/v1/sessions/{session_id}/turns", response_model=S.TurnResponse, openapi_extra=body_spec(S.TurnRequest))
    async def add_turn(self, session_id: str, request: Request):
        return await self._http(request, "turn", session_id)

    @api.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str) -> dict:
        check_sid(session_id)
        s = await self._session("get", session_id)
        if s is None:
            raise ApiError(404, f"no session {session_id!r} (never started, deleted, or expired)")
        return {"session_id": session_id, "n_turns": s["n_turns"], "model": s.get("adapter"),
                "turns": [{"speaker": r["speaker"], "text": r["text"]} for r in s["turns"]]}

    @api.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str) -> dict:
        check_sid(session_id)
        return {"session_id": session_id, "deleted": bool(await self._session("delete", session_id))}

