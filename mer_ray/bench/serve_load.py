"""Payloads, load generators and CPU accounting of ``mer bench serve`` (no Ray here).

Every side gets the same payloads: Serve and the uvicorn baseline through
:func:`load_http` (client threads on 127.0.0.1), the in-process pipeline through
:func:`load_inprocess` (one dialogue per call) and :func:`load_inprocess_batched`
(many dialogues per featurizer call). Each returns one row of the sweep table.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import numpy as np


class PayloadError(ValueError):
    """No payload source was named: MELD dev dialogues need ``--data-dir``; or pass ``--payloads generated``."""


def payloads(data_dir: Path | str | None, kind: str = "meld", max_turns: int = 24) -> tuple[list[list[dict]], str]:
    """Dialogues as lists of ``{"speaker", "text"}`` (each cut to ``max_turns``), and where they came from.

    Args:
        data_dir: a MELD directory (``dev_sent_emo.csv``); None: ``$MER_MELD_DIR``.
        kind: ``meld`` (the default: MELD dev, which must then exist) or ``generated`` (the demo corpus).

    Raises:
        PayloadError: ``kind`` is ``meld`` and no MELD dev split was found (the message names both options).
    """
    if kind not in ("meld", "generated"):
        raise PayloadError(f"--payloads must be 'meld' or 'generated', not {kind!r}")
    if kind == "generated":
        from mer_ray.demo.corpus import make_rows

        out: dict[str, list] = {}
        for r in make_rows(n_dialogues=100, seed=0):
            out.setdefault(r["dialogue_id"], []).append({"speaker": r["speaker"], "text": r["text"]})
        return [d[:max_turns] for d in out.values()], "generated"
    data_dir = data_dir or os.environ.get("MER_MELD_DIR")
    if not data_dir or not (Path(data_dir) / "dev_sent_emo.csv").exists():
        where = f"{data_dir}/dev_sent_emo.csv does not exist" if data_dir else "no --data-dir given and $MER_MELD_DIR is unset"
        raise PayloadError(f"bench serve needs MELD dev dialogues as payloads ({where}): pass --data-dir DIR (a MELD "
                           "directory holding dev_sent_emo.csv), or --payloads generated for the demo corpus's dialogues")
    from mer_ray.data.loaders import load_meld

    t = load_meld(Path(data_dir), "dev").select(["dialogue_id", "speaker", "text"]).to_pylist()
    out = {}
    for r in t:
        out.setdefault(r["dialogue_id"], []).append({"speaker": r["speaker"] or "", "text": (r["text"] or "")[:2000]})
    return [d[:max_turns] for d in out.values()], f"meld_dev ({data_dir})"


def stats(lat: list[float], errors: int, wall: float, **kw) -> dict:
    """One sweep row: requests/s, latency percentiles (ms) and errors, plus the setting ``kw``."""
    a = np.asarray(lat) * 1e3 if lat else np.zeros(1)
    return {**kw, "requests": len(lat) + errors, "errors": errors, "wall_s": round(wall, 3),
            "rps": round(len(lat) / wall, 3) if wall > 0 else 0.0, "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "mean_ms": round(float(a.mean()), 2)}


def _mean_timing(timings: list[dict]) -> dict | None:
    keys = sorted({k for t in timings for k in t})
    return {k: round(float(np.mean([t[k] for t in timings if k in t])), 2) for k in keys} if timings else None


def load_http(url: str, dialogues, n: int, concurrency: int, use_llm: bool, mode: str = "serve") -> dict:
    """``n`` POSTs from ``concurrency`` client threads, request ``i`` carrying dialogue ``i % len``.

    With ``use_llm`` the answers are parsed for their ``timing_ms`` (mean per stage in the row); without it
    they are not, so the load generator's own CPU stays the same for every side.
    """
    import httpx

    lat: list[float] = []
    errs: list[str] = []
    timings: list[dict] = []
    nxt = iter(range(n))
    lock = threading.Lock()

    def worker():
        with httpx.Client(timeout=600) as c:
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    r = c.post(url + "/v1/recognize", json={"utterances": dialogues[i % len(dialogues)], "use_llm": use_llm})
                    ok = r.status_code == 200
                    msg = f"{r.status_code}: {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, msg = False, repr(e)
                dt = time.perf_counter() - t
                with lock:
                    (lat.append(dt) if ok else errs.append(msg))
                    if ok and use_llm:
                        timings.append(r.json().get("timing_ms") or {})

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return stats(lat, len(errs), time.perf_counter() - t0, mode=mode, concurrency=concurrency, use_llm=use_llm,
                 timing_ms_mean=_mean_timing(timings), first_errors=errs[:3])


async def _respond(ens, req, rows=None) -> dict:
    """One validated request through ``ens`` (``rows``: already featurized), serialised as the HTTP answer is."""
    from mer_ray.serve import schemas as S

    if rows is None:
        out = await ens.recognize([u.model_dump() for u in req.utterances], req.use_llm, req.label_set, req.alpha)
    else:
        out = await ens.predict_rows(rows, req.use_llm, req.label_set, alpha=req.alpha)
    json.dumps(S.RecognizeResponse.model_validate(out).model_dump())
    return out


def load_inprocess(ens, dialogues, n: int, concurrency: int, use_llm: bool) -> dict:
    """The same requests through the :class:`Ensemble` on local stage objects (no Ray, no HTTP), one dialogue per call."""
    from mer_ray.serve import schemas as S

    async def run():
        lat: list[float] = []
        errs: list[str] = []
        it = iter(range(n))

        async def worker():
            for i in it:
                t = time.perf_counter()
                try:
                    req = S.RecognizeRequest.model_validate({"utterances": dialogues[i % len(dialogues)], "use_llm": use_llm})
                    await _respond(ens, req)
                    lat.append(time.perf_counter() - t)
                except Exception as e:  # counted, as the HTTP run counts non-200 answers
                    errs.append(repr(e)[:200])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return stats(lat, len(errs), time.perf_counter() - t0, mode="inprocess", concurrency=concurrency,
                     use_llm=use_llm, first_errors=errs[:3])

    return asyncio.run(run())


def _batched(batch_fn, one_fn, items: list) -> list:
    """The member's batched entry point when it has one (``featurize_batch``/``predict_batch``), else one call per item;
    an item that failed raises here (the whole group counts as failed)."""
    out = batch_fn(items) if batch_fn is not None else [one_fn(it) for it in items]
    for o in out:
        if isinstance(o, Exception):
            raise o
    return out


def featurize_group(featurizer, groups: list[list[dict]]) -> list[list[dict]]:
    """Feature rows of several dialogues: one featurizer call (``featurize_batch``), else ``featurize`` on the
    concatenated utterances, split back (turns renumbered per dialogue)."""
    if getattr(featurizer, "featurize_batch", None) is not None:
        return _batched(featurizer.featurize_batch, None, groups)
    rows = featurizer.featurize([u for g in groups for u in g])
    out, k = [], 0
    for g in groups:
        out.append([{**r, "turn": j} for j, r in enumerate(rows[k:k + len(g)])])
        k += len(g)
    return out


def load_inprocess_batched(ens, featurizer, vanilla, dialogues, n: int, batch: int) -> dict:
    """``n`` requests in groups of ``batch`` dialogues: one featurizer call and one vanilla call per group (their
    batched entry points, as the Serve deployments' ``@serve.batch`` calls them), then each dialogue's answer through
    the same :class:`Ensemble` logic. A request's latency is its group's wall time (they all wait for the one call)."""
    import copy

    from mer_ray.serve import schemas as S

    done: dict[int, dict] = {}

    async def precomputed(rows):  # the group's vanilla output for these rows
        return done.pop(id(rows))

    ens = copy.copy(ens)
    ens.vanilla = precomputed

    def stages(utts: list[list[dict]]):
        groups = featurize_group(featurizer, utts)
        return groups, _batched(getattr(vanilla, "predict_batch", None), vanilla.predict, groups)

    async def run():
        lat: list[float] = []
        errs: list[str] = []
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            idx = range(start, min(n, start + batch))
            t = time.perf_counter()
            try:
                reqs = [S.RecognizeRequest.model_validate({"utterances": dialogues[i % len(dialogues)], "use_llm": False}) for i in idx]
                groups, van = await asyncio.to_thread(stages, [[u.model_dump() for u in r.utterances] for r in reqs])
                for req, rows, v in zip(reqs, groups, van):
                    done[id(rows)] = v
                    await _respond(ens, req, rows)
                lat += [time.perf_counter() - t] * len(idx)
            except Exception as e:
                errs += [repr(e)[:200]] * len(idx)
        return stats(lat, len(errs), time.perf_counter() - t0, mode="inprocess_batched", concurrency=batch, use_llm=False,
                     first_errors=errs[:3])

    return asyncio.run(run())


def stage_cpu_ms(featurizer, vanilla, dialogues, k: int = 30) -> dict:
    """CPU milliseconds per request of each stage, called one after another (torch's threads as set by the caller).

    ``thread_time`` counts this thread alone, where torch runs its one intra-op thread (the caller sets one), so
    threads left in this process (a shut-down Ray driver's) do not count.
    """
    feat = van = 0.0
    k = min(k, len(dialogues))
    for d in dialogues[:k]:
        t = time.thread_time()
        rows = featurizer.featurize(d)
        feat += time.thread_time() - t
        t = time.thread_time()
        vanilla.predict(rows)
        van += time.thread_time() - t
    return {"featurize": round(feat / k * 1e3, 2), "vanilla": round(van / k * 1e3, 2), "dialogues": k}


class CpuMeter:
    """CPU seconds of a process tree by process, between :meth:`start` and :meth:`stop` (psutil).

    Ray's workers carry their role in their title (``ray::ServeReplica:mer:Featurizer``, ``ray::ProxyActor``);
    other processes are named by their executable (``raylet``, ``gcs_server``).
    """

    def __init__(self, pid: int | None = None, children: bool = True):
        import psutil

        self.root, self.children = psutil.Process(pid or os.getpid()), children

    def _snapshot(self) -> dict:
        import psutil

        out = {}
        procs = [self.root, *(self.root.children(recursive=True) if self.children else [])]
        for p in procs:
            try:
                c = p.cpu_times()
                title = (p.cmdline() or [p.name()])[0]
                out[p.pid] = (title if title.startswith("ray::") else p.name(), c.user + c.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def start(self) -> None:
        self._t0 = self._snapshot()

    def stop(self) -> dict[str, float]:
        """CPU seconds by process label since :meth:`start` (the bench process itself is ``self``)."""
        out: dict[str, float] = {}
        for pid, (name, cpu) in self._snapshot().items():
            name = "self" if pid == self.root.pid and self.children else name
            out[name] = out.get(name, 0.0) + cpu - self._t0.get(pid, (name, 0.0))[1]
        return {k: round(v, 3) for k, v in sorted(out.items()) if v > 0.005}
