"""The FastAPI ingress deployment: HTTP in, ``DeploymentHandle`` calls to the stages out.

Every request is checked in this order, each failure answered with a JSON body
``{"error": message, "detail": [...]}`` whose message names the problem:
API key (401) -> body size (413, before the body is read when Content-Length
says so) -> JSON syntax (422) -> schema, unknown fields included (422) ->
configured limits (422 for text length and counts, 413 for one media upload) ->
label set (422). The request bodies' OpenAPI schemas are generated from the same
pydantic models that validate them, so the served spec cannot drift.
"""

# No `from __future__ import annotations`: Serve's class-based view needs real annotations (Request).
import hmac
import json
import os
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray import serve

from mer_ray.data.labels import LABEL_SETS
from mer_ray.serve import schemas as S
from mer_ray.serve.config import ServeConfig
from mer_ray.serve.featurize import MediaError
from mer_ray.serve.pipeline import Ensemble, LabelSetError, available_label_sets, label_map
from mer_ray.serve.sessions import SessionStore, get_store

_MEDIA_HINT = "media must be sent as base64 content in video_b64/audio_b64, never as a path or URL"


class ApiError(Exception):
    def __init__(self, status: int, message: str, detail: list | None = None):
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail or []


def _pydantic_error(err: ValidationError | RequestValidationError) -> ApiError:
    detail = [{"loc": [str(x) for x in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors()]  # no echo of input
    parts = []
    for d in detail:
        loc = ".".join(x for x in d["loc"] if x != "body")
        hint = f" ({_MEDIA_HINT})" if d["type"] == "extra_forbidden" and any(k in loc for k in ("video", "audio", "path", "url", "file")) else ""
        parts.append(f"{loc or 'body'}: {d['msg']}{hint}")
    return ApiError(422, "invalid request: " + "; ".join(parts), detail)


api = FastAPI(title="mer-ray", version="0.1.0",
              description="Multimodal emotion recognition in conversations: vanilla model + Lantern LLM refinement + fusion, on Ray Serve.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return JSONResponse({"error": exc.message, "detail": exc.detail}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    e = _pydantic_error(exc)
    return JSONResponse({"error": e.message, "detail": e.detail}, status_code=422)


def _body_spec(model: type[BaseModel]) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _openapi():
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        spec = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        comps = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (S.RecognizeRequest, S.BatchRequest, S.TurnRequest):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(js.pop("$defs", {}))
            comps[model.__name__] = js
        api.openapi_schema = spec
    return api.openapi_schema


api.openapi = _openapi


def _check_sid(sid: str) -> None:
    if not re.match(S.SESSION_ID, sid):
        raise ApiError(422, f"session_id {sid[:80]!r} must match {S.SESSION_ID}")


class _Store:
    """Session store client: the named actor under Ray, a plain store without it (local testing)."""

    def __init__(self, cfg):
        import ray

        self.actor = get_store(cfg) if ray.is_initialized() else None
        self.local = None if self.actor else SessionStore(cfg.ttl_s, cfg.max_sessions, cfg.max_turns, cfg.persist_dir)

    async def __call__(self, method: str, *args):
        if self.local is not None:
            return getattr(self.local, method)(*args)
        return await getattr(self.actor, method).remote(*args)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    """Routes; the stages are ``DeploymentHandle``s bound by :func:`mer_ray.serve.app.build_app`."""

    def __init__(self, cfg: dict, featurizer, vanilla, refiner=None, fusion=None, mllm=None):
        self.cfg = ServeConfig.model_validate(cfg)
        self.api_key = None
        if self.cfg.api_key_env:
            self.api_key = os.environ.get(self.cfg.api_key_env)
            if not self.api_key:
                raise RuntimeError(f"api_key_env is {self.cfg.api_key_env!r} but that environment variable is unset or empty")
        self.ens = Ensemble(featurizer.featurize.remote, vanilla.predict.remote, vanilla.label_set_name.remote,
                            refiner.refine.remote if refiner else None, fusion.fuse.remote if fusion else None,
                            mllm.predict.remote if mllm else None)
        self.store = _Store(self.cfg.sessions)
        self._model_set: str | None = None

    async def _model_label_set(self) -> str:
        if self._model_set is None:
            self._model_set = await self.ens.label_set()
        return self._model_set

    def _auth(self, headers) -> None:
        if self.api_key is not None:
            auth = headers.get("authorization", "")
            if not (auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(), self.api_key.encode())):
                raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be over the limit."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body is over the limit of {limit} bytes")
        return bytes(body)

    def _parse(self, body: bytes, model: type[BaseModel]):
        if len(body) > self.cfg.max_body_bytes:
            raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {self.cfg.max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(422, f"malformed JSON: {e}") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _pydantic_error(e) from None

    def _check(self, req: S.RecognizeRequest | S.TurnRequest, where: str = "") -> None:
        utts = [req.utterance] if isinstance(req, S.TurnRequest) else req.utterances
        name = "utterance" if isinstance(req, S.TurnRequest) else "utterances"
        if len(utts) > self.cfg.max_utterances:
            raise ApiError(422, f"{where}utterances: {len(utts)} utterances is over the limit of {self.cfg.max_utterances}")
        for i, u in enumerate(utts):
            loc = f"{where}{name}" + ("" if name == "utterance" else f"[{i}]")
            if len(u.text) > self.cfg.max_text_chars:
                raise ApiError(422, f"{loc}.text: {len(u.text)} characters is over the limit of {self.cfg.max_text_chars}")
            for key in ("video_b64", "audio_b64"):
                v = getattr(u, key)
                size = None if v is None else len(v) * 3 // 4 - len(v[-2:]) + len(v[-2:].rstrip("="))  # decoded bytes
                if size is not None and size > self.cfg.max_media_bytes:
                    raise ApiError(413, f"{loc}.{key}: upload of {size} bytes is over the limit of {self.cfg.max_media_bytes} bytes")

    async def _labels(self, label_set: str | None, use_llm: bool) -> tuple[str | None, bool]:
        try:
            label_map(await self._model_label_set(), label_set)
        except LabelSetError as e:
            raise ApiError(422, str(e)) from None
        return label_set, use_llm and self.ens.refine is not None

    async def _run(self, coro):
        try:
            return await coro
        except MediaError as e:
            raise ApiError(422, str(e)) from None

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model_label_set": await self._model_label_set(), "llm": self.ens.refine is not None,
                "mllm": self.ens.mllm is not None}

    @api.get("/v1/labels", response_model=S.LabelsResponse)
    async def labels(self) -> S.LabelsResponse:
        m = await self._model_label_set()
        return S.LabelsResponse(model_label_set=m, label_sets={k: list(v.labels) for k, v in LABEL_SETS.items()},
                                available=available_label_sets(m))

    async def _recognize(self, req: S.RecognizeRequest) -> dict:
        label_set, use_llm = await self._labels(req.label_set, req.use_llm)
        out = await self._run(self.ens.recognize([u.model_dump() for u in req.utterances], use_llm, label_set))
        return S.RecognizeResponse.model_validate(out).model_dump()

    async def call(self, route: str, body: bytes, headers: dict | None = None, session_id: str | None = None) -> tuple[int, dict]:
        """One POST request without the HTTP transport: ``(status, JSON body)``.

        ``route`` is ``recognize``, ``batch`` or ``turn``. The HTTP routes call this after reading
        the body; tests call it through a ``DeploymentHandle`` in local testing mode.
        """
        try:
            self._auth({k.lower(): v for k, v in (headers or {}).items()})
            if route == "recognize":
                req = self._parse(body, S.RecognizeRequest)
                self._check(req)
                return 200, await self._recognize(req)
            if route == "batch":
                import asyncio

                req = self._parse(body, S.BatchRequest)
                if len(req.dialogues) > self.cfg.max_dialogues:
                    raise ApiError(422, f"dialogues: {len(req.dialogues)} dialogues is over the limit of {self.cfg.max_dialogues}")
                for k, d in enumerate(req.dialogues):
                    self._check(d, where=f"dialogues[{k}].")
                return 200, {"results": await asyncio.gather(*(self._recognize(d) for d in req.dialogues))}
            if route == "turn":
                _check_sid(session_id or "")
                return 200, await self._turn(session_id, self._parse(body, S.TurnRequest))
            raise ValueError(f"unknown route {route!r}")
        except ApiError as e:
            return e.status, {"error": e.message, "detail": e.detail}

    async def _turn(self, session_id: str, req: S.TurnRequest) -> dict:
        self._check(req)
        label_set, use_llm = await self._labels(req.label_set, req.use_llm)
        t0 = time.perf_counter()
        row = (await self._run(self.ens.featurize([req.utterance.model_dump()])))[0]
        timing = {"features": (time.perf_counter() - t0) * 1e3}
        turn, rows = await self.store("append", session_id, row)
        for k, r in enumerate(rows):  # positions in the kept context
            r["turn"] = k
        out = await self.ens.predict_rows(rows, use_llm, label_set, targets=[len(rows) - 1], timing=timing)
        timing["total"] = (time.perf_counter() - t0) * 1e3
        return S.TurnResponse.model_validate({
            "session_id": session_id, "turn": turn, "n_context": len(rows), "label_set": out["label_set"],
            "labels": out["labels"], "utterance": out["utterances"][0], "timing_ms": timing}).model_dump()

    async def _http(self, request: Request, route: str, session_id: str | None = None) -> JSONResponse:
        self._auth(request.headers)  # before reading a body
        body = await self._read_body(request)
        status, payload = await self.call(route, body, dict(request.headers), session_id)
        return JSONResponse(payload, status_code=status)

    @api.post("/v1/recognize", response_model=S.RecognizeResponse, openapi_extra=_body_spec(S.RecognizeRequest))
    async def recognize(self, request: Request):
        return await self._http(request, "recognize")

    @api.post("/v1/recognize:batch", response_model=S.BatchResponse, openapi_extra=_body_spec(S.BatchRequest))
    async def recognize_batch(self, request: Request):
        return await self._http(request, "batch")

    @api.post("/v1/sessions/{session_id}/turns", response_model=S.TurnResponse, openapi_extra=_body_spec(S.TurnRequest))
    async def add_turn(self, session_id: str, request: Request):
        return await self._http(request, "turn", session_id)

    @api.get("/v1/sessions/{session_id}")
    async def get_session(self, session_id: str) -> dict:
        _check_sid(session_id)
        s = await self.store("get", session_id)
        if s is None:
            raise ApiError(404, f"no session {session_id!r} (never started, deleted, or expired)")
        return {"session_id": session_id, "n_turns": s["n_turns"],
                "turns": [{"speaker": r["speaker"], "text": r["text"]} for r in s["turns"]]}

    @api.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str) -> dict:
        _check_sid(session_id)
        return {"session_id": session_id, "deleted": bool(await self.store("delete", session_id))}

