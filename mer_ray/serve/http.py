"""HTTP plumbing of the ingress: the FastAPI app, error bodies, OpenAPI, request parsing and limits.

Every failure is answered with ``{"error": message, "detail": [...]}`` whose
message names the problem. The request bodies' OpenAPI schemas are generated
from the same pydantic models that validate them, so the served spec cannot drift.
"""

# No `from __future__ import annotations`: FastAPI reads these handlers' annotations.
import hmac
import json
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ValidationError

from mer_ray.serve import schemas as S
from mer_ray.serve.config import ServeConfig

_MEDIA_HINT = "media must be sent as base64 content in video_b64/audio_b64, never as a path or URL"


#: Seconds a client is told to wait (``Retry-After``) after a 503: about what Serve takes to replace a replica.
RETRY_AFTER_S = 5


class ApiError(Exception):
    """An answer other than 200: ``status``, a message naming the problem, and extra body fields (``next_turn``)."""

    def __init__(self, status: int, message: str, detail: list | None = None, retry_after: int | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.detail, self.retry_after, self.extra = status, message, detail or [], retry_after, extra

    def body(self) -> dict:
        return {"error": self.message, "detail": self.detail, **self.extra,
                **({} if self.retry_after is None else {"retry_after_s": self.retry_after})}


def error_response(status: int, body: dict) -> JSONResponse:
    """The JSON answer of an error body; a 503 carries ``Retry-After`` (the body's ``retry_after_s``)."""
    after = body.get("retry_after_s")
    return JSONResponse(body, status_code=status, headers=None if after is None else {"Retry-After": str(after)})


def transient_errors() -> tuple[type[BaseException], ...]:
    """Failures of our own serving that a retry can cure: a stage replica dying or being replaced, Serve shedding
    load, the session store briefly locked or unreachable. Everything else that is not an :class:`ApiError` is a bug."""
    import sqlite3

    import ray.exceptions as rex
    import ray.serve.exceptions as sex

    out = [rex.RayActorError, rex.ActorUnavailableError, rex.ActorUnschedulableError, rex.ObjectLostError,
           sex.RayServeException, sqlite3.OperationalError]  # RayServeException: DeploymentUnavailable, BackPressure, ...
    try:
        import redis

        out += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # the redis client is needed only with sessions.backend: redis
        pass
    return tuple(out)


def unavailable(e: BaseException) -> ApiError:
    return ApiError(503, f"temporarily unavailable ({type(e).__name__}); retry after {RETRY_AFTER_S} s", retry_after=RETRY_AFTER_S)


def pydantic_error(err: ValidationError | RequestValidationError) -> ApiError:
    detail = [{"loc": [str(x) for x in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in err.errors()]  # no echo of input
    parts = []
    for d in detail:
        loc = ".".join(x for x in d["loc"] if x != "body")
        hint = f" ({_MEDIA_HINT})" if d["type"] == "extra_forbidden" and any(k in loc for k in ("video", "audio", "path", "url", "file")) else ""
        parts.append(f"{loc or 'body'}: {d['msg']}{hint}")
    return ApiError(422, "invalid request: " + "; ".join(parts), detail)


#: Our users' machines are often offline: FastAPIOffline serves /docs and /redoc with the Swagger UI and ReDoc
#: assets that the ``fastapi-offline`` package ships (under DOCS_STATIC), where FastAPI's default pages load a CDN.
#: ``validatorUrl: None`` stops Swagger UI from sending the spec to its online validator.
DOCS_STATIC = "/docs-static"
api = FastAPIOffline(title="mer-ray", version="0.1.0", static_url=DOCS_STATIC, swagger_ui_parameters={"validatorUrl": None},
                     description="Multimodal emotion recognition in conversations: vanilla model + Lantern LLM refinement + fusion, "
                                 "on Ray Serve. Probabilities are calibrated and come with split-conformal prediction sets when the "
                                 "models dir has a calibration.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return error_response(exc.status, exc.body())


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    """The GET routes' last resort: a transient failure is a 503 with Retry-After, a bug a 500 that names it."""
    if isinstance(exc, transient_errors()):
        return error_response(503, unavailable(exc).body())
    return error_response(500, {"error": f"internal error: {type(exc).__name__}: {str(exc)[:200]}", "detail": []})


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    e = pydantic_error(exc)
    return JSONResponse({"error": e.message, "detail": e.detail}, status_code=422)


def body_spec(model: type[BaseModel]) -> dict:
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


def check_sid(sid: str) -> None:
    if not re.match(S.SESSION_ID, sid):
        raise ApiError(422, f"session_id {sid[:80]!r} must match {S.SESSION_ID}")


def check_auth(headers, api_key: str | None) -> None:
    """401 unless ``Authorization: Bearer <api_key>`` (no check when ``api_key`` is None)."""
    if api_key is not None:
        auth = headers.get("authorization", "")
        if not (auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


def parse(body: bytes, model: type[BaseModel], limit: int):
    """Size (413), JSON syntax (422), then the pydantic model (422, unknown fields included)."""
    if len(body) > limit:
        raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(422, f"malformed JSON: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise pydantic_error(e) from None


def check_limits(req, cfg: ServeConfig, where: str = "") -> None:
    """The configured limits: 422 for text length and counts, 413 for one media upload."""
    utts = [req.utterance] if isinstance(req, S.TurnRequest) else req.utterances
    name = "utterance" if isinstance(req, S.TurnRequest) else "utterances"
    if len(utts) > cfg.max_utterances:
        raise ApiError(422, f"{where}utterances: {len(utts)} utterances is over the limit of {cfg.max_utterances}")
    for i, u in enumerate(utts):
        loc = f"{where}{name}" + ("" if name == "utterance" else f"[{i}]")
        if len(u.text) > cfg.max_text_chars:
            raise ApiError(422, f"{loc}.text: {len(u.text)} characters is over the limit of {cfg.max_text_chars}")
        for key in ("video_b64", "audio_b64"):
            v = getattr(u, key)
            size = None if v is None else len(v) * 3 // 4 - len(v[-2:]) + len(v[-2:].rstrip("="))  # decoded bytes
            if size is not None and size > cfg.max_media_bytes:
                raise ApiError(413, f"{loc}.{key}: upload of {size} bytes is over the limit of {cfg.max_media_bytes} bytes")
