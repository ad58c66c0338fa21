"""The FastAPI ingress deployment: HTTP in, ``DeploymentHandle`` calls to the members out.

Every request is checked in this order (``mer_ray/serve/http.py``): API key (401)
-> body size (413, before the body is read when Content-Length says so) -> JSON
syntax (422) -> schema, unknown fields included (422) -> configured limits (422
for text length and counts, 413 for one media upload) -> label set (422).
"""

# No `from __future__ import annotations`: Serve's class-based view needs real annotations (Request).
import asyncio
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
from mer_ray.serve.http import ApiError, api, body_spec, check_auth, check_limits, check_sid, parse, read_body
from mer_ray.serve.sessions import SessionStore, get_store, speaker_summary

#: A file name under ``static/``: no separator, no leading dot (so no ``..``), nothing a path could smuggle.
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


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
    """Routes; the members are ``DeploymentHandle``s bound by :func:`mer_ray.serve.builder.build_app`."""

    def __init__(self, cfg: dict, featurizer, vanilla, refiner=None, fusion=None, mllm=None, members: dict | None = None,
                 ensemble_fusion=None):
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
                            calibration=Calibration.load(self.cfg.models_dir))
        self.store = _Store(self.cfg.sessions)

    async def _options(self, req, where: str = "") -> tuple[str | None, bool]:
        """Check a request's label set and alpha (422 naming them); the label set and the effective ``use_llm``."""
        try:
            label_map(await self.ens.model_label_set(), req.label_set)
            self.ens.resolve_alpha(req.alpha)
        except (LabelSetError, AlphaError) as e:
            raise ApiError(422, f"{where}{e}") from None
        return req.label_set, req.use_llm and self.ens.has_llm

    async def _run(self, coro):
        try:
            return await coro
        except MediaError as e:
            raise ApiError(422, str(e)) from None

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
                                available=available_label_sets(m))

    async def _recognize(self, req: S.RecognizeRequest) -> dict:
        label_set, use_llm = await self._options(req)
        out = await self._run(self.ens.recognize([u.model_dump() for u in req.utterances], use_llm, label_set, req.alpha))
        return S.RecognizeResponse.model_validate(out).model_dump()

    async def call(self, route: str, body: bytes, headers: dict | None = None, session_id: str | None = None) -> tuple[int, dict]:
        """One POST request without the HTTP transport: ``(status, JSON body)``.

        ``route`` is ``recognize``, ``batch`` or ``turn``. The HTTP routes call this after reading
        the body; tests call it through a ``DeploymentHandle`` in local testing mode.
        """
        try:
            check_auth({k.lower(): v for k, v in (headers or {}).items()}, self.api_key)
            if route == "recognize":
                req = parse(body, S.RecognizeRequest, self.cfg.max_body_bytes)
                check_limits(req, self.cfg)
                return 200, await self._recognize(req)
            if route == "batch":
                req = parse(body, S.BatchRequest, self.cfg.max_body_bytes)
                if len(req.dialogues) > self.cfg.max_dialogues:
                    raise ApiError(422, f"dialogues: {len(req.dialogues)} dialogues is over the limit of {self.cfg.max_dialogues}")
                for k, d in enumerate(req.dialogues):
                    check_limits(d, self.cfg, where=f"dialogues[{k}].")
                    await self._options(d, where=f"dialogues[{k}]: ")
                return 200, {"results": await asyncio.gather(*(self._recognize(d) for d in req.dialogues))}
            if route == "turn":
                check_sid(session_id or "")
                return 200, await self._turn(session_id, parse(body, S.TurnRequest, self.cfg.max_body_bytes))
            raise ValueError(f"unknown route {route!r}")
        except ApiError as e:
            return e.status, {"error": e.message, "detail": e.detail}

    async def _turn(self, session_id: str, req: S.TurnRequest) -> dict:
        check_limits(req, self.cfg)
        label_set, use_llm = await self._options(req)
        t0 = time.perf_counter()
        row = (await self._run(self.ens.featurize([req.utterance.model_dump()])))[0]
        timing = {"features": (time.perf_counter() - t0) * 1e3}
        turn, kept = await self.store("append", session_id, row)
        # the model's context: the kept turns' features, numbered by position (earlier answers stay in the store)
        rows = [{**{k: v for k, v in r.items() if k != "prediction"}, "turn": k} for k, r in enumerate(kept)]
        out = await self.ens.predict_rows(rows, use_llm, label_set, targets=[len(rows) - 1], timing=timing, alpha=req.alpha)
        u = out["utterances"][0]
        pred = {"turn": turn, "label_set": out["label_set"], "label": u["label"], "probs": u["probs"]}
        await self.store("annotate", session_id, turn, pred)
        speakers = speaker_summary([*kept[:-1], {**kept[-1], "prediction": pred}], out["label_set"])
        timing["total"] = (time.perf_counter() - t0) * 1e3
        return S.TurnResponse.model_validate({
            "session_id": session_id, "turn": turn, "n_context": len(rows), "speakers": speakers, "utterance": u, "timing_ms": timing,
            **{k: out[k] for k in ("label_set", "labels", "calibrated", "alpha", "conformal")}}).model_dump()

    async def _http(self, request: Request, route: str, session_id: str | None = None) -> JSONResponse:
        check_auth(request.headers, self.api_key)  # before reading a body
        body = await read_body(request, self.cfg.max_body_bytes)
        status, payload = await self.call(route, body, dict(request.headers), session_id)
        return JSONResponse(payload, status_code=status)

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
        s = await self.store("get", session_id)
        if s is None:
            raise ApiError(404, f"no session {session_id!r} (never started, deleted, or expired)")
        return {"session_id": session_id, "n_turns": s["n_turns"],
                "turns": [{"speaker": r["speaker"], "text": r["text"]} for r in s["turns"]]}

    @api.delete("/v1/sessions/{session_id}")
    async def delete_session(self, session_id: str) -> dict:
        check_sid(session_id)
        return {"session_id": session_id, "deleted": bool(await self.store("delete", session_id))}

