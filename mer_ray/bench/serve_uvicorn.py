"""The server a user would write instead of Ray Serve: the same stages behind one FastAPI app in one uvicorn process.

``python -m mer_ray.bench.serve_uvicorn --models DIR --port P --torch-threads T --pool N`` serves
``POST /v1/recognize`` with the Serve app's request and response models
(:mod:`mer_ray.serve.schemas`), its limits and its error codes, on the same plain
stage objects (:class:`RequestFeaturizer`, the vanilla member chosen as the Vanilla
deployment chooses it) and the same :class:`Ensemble` request logic. No Ray is
imported. The blocking model calls run in a thread pool of ``N`` workers (the
event loop keeps parsing and answering meanwhile), which is also the size of
anyio's default limiter, so nothing else in the app runs more threads than that.
``mer bench serve`` starts it with :class:`UvicornServer`.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations, whose models are imported locally.

import argparse
import asyncio
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager


def build_app(models_dir: str, torch_threads: int = 1, pool: int = 16):
    """The FastAPI app: ``/healthz`` and ``POST /v1/recognize`` on local stage objects, ``pool`` model threads."""
    import anyio.to_thread
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from mer_ray.calibration.artifacts import Calibration
    from mer_ray.serve import schemas as S
    from mer_ray.serve.config import ServeConfig
    from mer_ray.serve.ensemble import AlphaError, Ensemble, LabelSetError
    from mer_ray.serve.ensemble_run import SeedAverageMember, is_ensemble_run
    from mer_ray.serve.featurize import MediaError, RequestFeaturizer
    from mer_ray.serve.http import ApiError, check_limits
    from mer_ray.serve.members import VanillaMember

    limits = ServeConfig(models_dir=models_dir)  # the Serve app's default limits (text length, counts, media size)
    featurizer = RequestFeaturizer(torch_threads)
    vanilla = (SeedAverageMember if is_ensemble_run(models_dir) else VanillaMember)(models_dir, torch_threads)
    executor = ThreadPoolExecutor(pool, thread_name_prefix="mer-model")

    def in_pool(fn):
        async def call(*args):
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

        return call

    ens = Ensemble(in_pool(featurizer.featurize), in_pool(vanilla.predict), in_pool(vanilla.label_set_name),
                   calibration=Calibration.load(models_dir))

    @asynccontextmanager
    async def lifespan(app):
        anyio.to_thread.current_default_thread_limiter().total_tokens = pool  # FastAPI's own sync work: the same bound
        await ens.model_label_set()  # asked once, before the first request
        yield
        executor.shutdown(wait=False)

    app = FastAPI(title="mer-ray (plain uvicorn baseline)", lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model_label_set": await ens.model_label_set(), "pool": pool, "torch_threads": torch_threads}

    @app.post("/v1/recognize", response_model=S.RecognizeResponse)
    async def recognize(req: S.RecognizeRequest):
        try:
            check_limits(req, limits)
            return await ens.recognize([u.model_dump() for u in req.utterances], False, req.label_set, req.alpha)
        except ApiError as e:
            return JSONResponse({"error": e.message, "detail": e.detail}, status_code=e.status)
        except (LabelSetError, AlphaError, MediaError) as e:
            return JSONResponse({"error": str(e), "detail": []}, status_code=422)

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", required=True, help="models dir (as mer serve's models_dir)")
    p.add_argument("--port", type=int, default=8021)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--torch-threads", type=int, default=1, help="torch.set_num_threads for the encoders and the model")
    p.add_argument("--pool", type=int, default=16, help="worker threads that run the blocking model calls")
    a = p.parse_args(argv)
    import uvicorn

    # One process, one event loop; no access log (a production server ships logs elsewhere, or samples them).
    uvicorn.run(build_app(a.models, a.torch_threads, a.pool), host=a.host, port=a.port, log_level="warning", access_log=False)


class UvicornServer:
    """``with UvicornServer(models, port, threads, pool) as url:`` the baseline in a subprocess, up and answering."""

    def __init__(self, models_dir: str, port: int, torch_threads: int, pool: int, timeout_s: float = 300.0):
        self.cmd = [sys.executable, "-m", "mer_ray.bench.serve_uvicorn", "--models", str(models_dir), "--port", str(port),
                    "--torch-threads", str(torch_threads), "--pool", str(pool)]
        self.url, self.timeout_s, self.proc = f"http://127.0.0.1:{port}", timeout_s, None

    def __enter__(self) -> str:
        import httpx

        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen(self.cmd, env=env)
        deadline = time.time() + self.timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the uvicorn baseline exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.__exit__()
                raise TimeoutError(f"{self.url}/healthz did not answer within {self.timeout_s:.0f} s")
            time.sleep(0.3)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


if __name__ == "__main__":
    main()
