"""Serve kill scenarios (issue 15 items 5 and 6): SIGKILL one process under a bounded HTTP load, count what failed.

Each scenario returns ``{"injected": {"target", "pid", "at_s", "progress"}, "expected", "observed", "lost",
"duplicated", "failed_requests": {status: count}, "recovery_s"}``. ``expected``/``observed`` are requests
sent/answered 200 (turns for ``session_store``); ``recovery_s`` is measured, never asserted: with two
replicas the time until the deployment is back at full strength, with one the time from the kill to the
first success after it. Everything targets 127.0.0.1, with a bounded number of requests and a time limit.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from mer_ray.bench.chaos_cluster import kill_pid, skipped

DIALOGUE = [{"speaker": "Ross", "text": "We were on a break!"}, {"speaker": "Rachel", "text": "Oh, I can't believe you said that."}]
HA_YAML = "serve/ha.yaml"
#: The request every load sends; the LLM scenarios send it with ``use_llm: true``.
BODY = {"utterances": DIALOGUE, "use_llm": False}
LLM_BODY = {"utterances": DIALOGUE, "use_llm": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def actor_pids(class_name: str) -> list[int]:
    """PIDs of the live actors of ``class_name`` (a replica is ``ServeReplica:<app>:<deployment>``).

    Read from the GCS actor table: ``ray.util.state.list_actors`` needs the dashboard, which a local test Ray lacks.
    """
    from ray._private import state

    table = state.actors(actor_state_name="ALIVE").values()
    return sorted(a["Pid"] for a in table if a["ActorClassName"] == class_name and a["Pid"])


def replica_pids(deployment: str, app: str = "mer") -> list[int]:
    return actor_pids(f"ServeReplica:{app}:{deployment}")


def deploy_app(models_dir: str, sessions_dir: str, port: int, replicas: int | None = None, yaml: str = HA_YAML,
               overrides: list[tuple[str, str]] | None = None, colocated: bool = False,
               extra_options: dict[str, dict] | None = None) -> str:
    """Deploy ``yaml`` (every deployment at ``replicas`` when given) on the connected Ray; the base URL.

    ``colocated``: the same YAML in the co-located layout, ``FeaturizerVanilla`` taking the ``Featurizer``
    entry's options (replicas, health checks) and the two stages' CPUs together. ``extra_options``: options of
    deployments the YAML does not list (the optional members the scenarios switch on).
    """
    from mer_ray.serve.deploy import deploy, resolve

    over = [("models_dir", models_dir), ("sessions.dir", sessions_dir), *(overrides or [])]
    if colocated:
        over.append(("layout", "colocated"))
    cfg, options, app = resolve(yaml, over)
    if colocated:
        feat, van = options.pop("Featurizer"), options.pop("Vanilla")
        cpus = feat["ray_actor_options"]["num_cpus"] + van["ray_actor_options"]["num_cpus"]
        options["FeaturizerVanilla"] = {**feat, "ray_actor_options": {**feat["ray_actor_options"], "num_cpus": cpus}}
    options.update(extra_options or {})
    if replicas is not None:
        options = {k: {**v, "num_replicas": replicas} for k, v in options.items()}
    return deploy(cfg, options, port=port, name=app.get("name", "mer"), timeout_s=300)


def _post(client, url: str, path: str, body: dict):
    import httpx

    try:
        r = client.post(url + path, json=body, timeout=60)
        return r.status_code, r.headers.get("retry-after"), r
    except httpx.HTTPError as e:
        return type(e).__name__, None, None  # no HTTP answer at all (the proxy gone)


def load(url: str, n: int, concurrency: int, kill_at: int, kill, time_limit_s: float = 120.0, body: dict = BODY) -> dict:
    """``n`` recognize requests (``body``) at ``concurrency``; ``kill()`` (returning ``(target, pid)``) once ``kill_at`` are done."""
    import httpx

    t0, lock, nxt, done, results, injected = time.time(), threading.Lock(), iter(range(n)), [0], [], {}

    def worker():
        with httpx.Client() as c:
            while time.time() - t0 < time_limit_s:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                start = time.time()
                status, after, _ = _post(c, url, "/v1/recognize", body)
                with lock:
                    results.append({"i": i, "status": status, "retry_after": after, "start": start, "end": time.time()})
                    done[0] += 1
                    fire = done[0] == kill_at
                if fire:
                    target, pid = kill()
                    injected.update(target=target, pid=pid, at_s=round(time.time() - t0, 3), progress=round(kill_at / n, 3))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    injected["t_kill"] = t0 + injected.get("at_s", 0.0)
    return {"results": results, "injected": injected, "n": n}


def _summary(run: dict, recovery_s: float | None) -> dict:
    res = run["results"]
    ok = {r["i"] for r in res if r["status"] == 200}
    failed = Counter(str(r["status"]) for r in res if r["status"] != 200)
    no_retry_after = sum(1 for r in res if r["status"] == 503 and not r["retry_after"])
    inj = {k: v for k, v in run["injected"].items() if k != "t_kill"}
    return {"injected": inj, "expected": run["n"], "observed": len(ok), "lost": run["n"] - len(ok),
            "duplicated": len(res) - len({r["i"] for r in res}), "failed_requests": dict(failed),
            "recovery_s": None if recovery_s is None else round(recovery_s, 3), "503_without_retry_after": no_retry_after}


def wait_back(deployment: str | None, want: int, killed: list[int], since: float, url: str, limit_s: float = 120.0,
              class_name: str | None = None) -> float | None:
    """Seconds from ``since`` until ``want`` replicas (actors of ``class_name``) run again, none of them a killed
    one, and ``/healthz`` answers; None past ``limit_s``."""
    import httpx
    from ray import serve

    cls = class_name or f"ServeReplica:mer:{deployment}"
    while time.time() - since < limit_s:
        try:
            pids = actor_pids(cls)
            running = len(pids) if class_name else serve.status().applications["mer"].deployments[deployment].replica_states.get("RUNNING", 0)
            if running >= want and not set(pids) & set(killed) and httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return time.time() - since
        except Exception:  # the controller or the proxy is down: not back yet
            pass
        time.sleep(0.25)
    return None


def first_success_after(results: list[dict], t_kill: float) -> float | None:
    ends = [r["end"] for r in results if r["status"] == 200 and r["start"] > t_kill]
    return min(ends) - t_kill if ends else None


def kill_one(deployment: str, url: str, n: int = 80, concurrency: int = 4, class_name: str | None = None,
             single: bool = False, body: dict = BODY, time_limit_s: float = 120.0) -> dict:
    """SIGKILL one live actor of ``deployment`` (or of ``class_name``) after 40% of a bounded load.

    ``single``: one replica per stage, so recovery is the time from the kill to the first success after it
    (probed after the load when the load ended first); else the time until the deployment is back at full strength.
    """
    import httpx

    cls = class_name or f"ServeReplica:mer:{deployment}"
    before = actor_pids(cls)

    def kill():
        kill_pid(before[0], missing_ok=True)
        return cls, before[0]

    run = load(url, n, concurrency, kill_at=int(n * 0.4), kill=kill, body=body, time_limit_s=time_limit_s)
    t_kill = run["injected"]["t_kill"]
    if not single:
        return _summary(run, wait_back(deployment, len(before), [before[0]], t_kill, url, class_name=class_name))
    rec = first_success_after(run["results"], t_kill)
    with httpx.Client() as c:
        while rec is None and time.time() - t_kill < 180:
            if _post(c, url, "/v1/recognize", body)[0] == 200:
                rec = time.time() - t_kill
            time.sleep(0.25)
    return _summary(run, rec)


def session_store(url: str, n_turns: int = 24, kill_at: int = 10, limit_s: float = 180.0) -> dict:
    """Stream ``n_turns`` turns with ``expected_turn`` and retries; SIGKILL every Ingress replica (each holds the open
    SQLite store) while turn ``kill_at`` is in flight. Lost/duplicated: the stored turns against the sent ones."""
    import httpx

    sid, t0, failed, injected = f"chaos-{int(time.time() * 1000)}", time.time(), Counter(), {}
    texts = [f"turn {k}: {DIALOGUE[k % 2]['text']}" for k in range(n_turns)]
    got_turns = []
    with httpx.Client() as c:
        for k in range(n_turns):
            body = {"utterance": {"speaker": DIALOGUE[k % 2]["speaker"], "text": texts[k]}, "use_llm": False, "expected_turn": k}
            if k == kill_at:
                pids = replica_pids("Ingress")
                threading.Timer(0.02, lambda p=pids: [kill_pid(x, missing_ok=True) for x in p]).start()  # lands while the turn is in flight
                injected = {"target": "ServeReplica:mer:Ingress (all replicas, the store's holders)", "pid": pids,
                            "at_s": round(time.time() - t0, 3), "progress": round(kill_at / n_turns, 3)}
            while time.time() - t0 < limit_s:
                status, _, r = _post(c, url, f"/v1/sessions/{sid}/turns", body)
                if status == 200:
                    got_turns.append(r.json()["turn"])
                    break
                failed[str(status)] += 1
                time.sleep(0.5)  # the client's retry, with the same expected_turn
    stored = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30).json()
    seen = [t["text"] for t in stored.get("turns", [])]
    return {"injected": injected, "expected": n_turns, "observed": stored.get("n_turns"),
            "lost": sum(1 for t in texts if t not in seen), "duplicated": len(seen) - len(set(seen)),
            "failed_requests": dict(failed), "recovery_s": None, "turns_answered": got_turns, "stored_in_order": seen == texts}


def run_serve_scenarios(models_dir: str, out_dir: str, optional_members: bool = True) -> dict[str, dict]:
    """Every Serve scenario, on the connected Ray (a fresh local one is started when none is): ``{name: result}``.

    Under ``serve/ha.yaml``: ``serve_Featurizer``, ``serve_Vanilla``, ``serve_Ingress``, ``session_store``,
    ``serve_proxy``, ``serve_controller``, and ``serve_LLMRefiner``, ``serve_Fusion`` under ``use_llm: true``
    requests (when ``models_dir`` has ``fusion/``; else the LLM path is off and they are recorded as skipped);
    in its co-located layout ``serve_FeaturizerVanilla``; with the optional members on (tiny Gemma-shaped
    models added to a copy of ``models_dir``) ``serve_MLLM`` and ``serve_Adapters``; then with one replica per
    stage ``serve_Featurizer_single``.
    """
    import ray
    from ray import serve

    from mer_ray.serve.deploy import start_local_ray

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=4, temp_dir=str(out / "ray"))
    port, res = free_port(), {}
    try:
        llm = (Path(models_dir) / "fusion").is_dir()  # the LLM path needs a fitted fusion module
        off = [("llm.enabled", "false")]
        url = deploy_app(models_dir, str(out / "sessions"), port, overrides=None if llm else off)
        for d in ("Featurizer", "Vanilla", "Ingress"):
            res[f"serve_{d}"] = kill_one(d, url)
        res.update(_llm_scenarios(url) if llm else _skipped_llm(models_dir))
        res["session_store"] = session_store(url)
        wait_back("Ingress", 2, [], time.time(), url)
        res["serve_proxy"] = kill_one("proxy", url, class_name="ProxyActor")
        res["serve_controller"] = kill_one("controller", url, class_name="ServeController")
        serve.delete("mer")
        url = deploy_app(models_dir, str(out / "sessions"), port, overrides=off, colocated=True)
        res["serve_FeaturizerVanilla"] = kill_one("FeaturizerVanilla", url)
        serve.delete("mer")
        if optional_members:
            res.update(optional_member_scenarios(models_dir, out, port))
        url = deploy_app(models_dir, str(out / "sessions"), port, replicas=1, overrides=off)
        res["serve_Featurizer_single"] = kill_one("Featurizer", url, single=True)
    finally:
        serve.shutdown()  # the caller's next scenario gets the CPUs back
        if started:
            ray.shutdown()
    (out / "serve_scenarios.json").write_text(json.dumps(res, indent=2))
    return res


def _llm_scenarios(url: str, n: int = 20, concurrency: int = 2) -> dict[str, dict]:
    """``serve_LLMRefiner`` and ``serve_Fusion`` under ``use_llm: true`` requests (fewer: each costs seconds of llama.cpp)."""
    return {f"serve_{d}": kill_one(d, url, n=n, concurrency=concurrency, body=LLM_BODY, time_limit_s=300.0)
            for d in ("LLMRefiner", "Fusion")}


def _skipped_llm(models_dir: str) -> dict[str, dict]:
    reason = f"{models_dir} has no fusion/ (mer lantern fit), so the LLM path cannot be deployed"
    return {f"serve_{d}": skipped(reason) for d in ("LLMRefiner", "Fusion")}


#: The optional members' options in their scenario: two replicas each, as serve/ha.yaml gives every deployment.
OPTIONAL_HA = {"num_replicas": 2, "max_ongoing_requests": 8, "health_check_period_s": 5, "health_check_timeout_s": 20,
               "ray_actor_options": {"num_cpus": 0.2}}


def with_optional_members(models_dir: str, root: Path) -> Path:
    """``models_dir`` (linked) plus a tiny fine-tuned MLLM in ``mllm/`` and one tiny adapter ``tiny`` (built, not trained)."""
    import shutil

    from mer_ray.mllm.adapters import install_adapter
    from mer_ray.mllm.tiny import build_tiny_finetuned, build_tiny_lm

    models = root / "models"
    if not (models / "mllm" / "adapters" / "tiny").exists():
        models.mkdir(parents=True, exist_ok=True)
        for child in Path(models_dir).iterdir():
            if child.name != "mllm" and not (models / child.name).exists():
                (models / child.name).symlink_to(child.resolve())
        base = build_tiny_lm(root / "base", "gemma3")
        shutil.copytree(build_tiny_finetuned(base, root / "ft_mllm", "meld7", 0), models / "mllm")
        install_adapter(build_tiny_finetuned(base, root / "ft_adapter", "meld7", 1), models, "tiny")
    return models


def optional_member_scenarios(models_dir: str, out: Path, port: int) -> dict[str, dict]:
    """``serve_MLLM`` (every request crosses it with ``use_mllm``) and ``serve_Adapters`` (requests naming ``tiny``)."""
    from ray import serve

    models = with_optional_members(models_dir, out / "optional")
    url = deploy_app(str(models), str(out / "sessions"), port,
                     overrides=[("llm.enabled", "false"), ("use_mllm", "true"), ("adapters.enabled", "true")],
                     extra_options={"MLLM": OPTIONAL_HA, "Adapters": OPTIONAL_HA})
    try:
        return {"serve_MLLM": kill_one("MLLM", url),
                "serve_Adapters": kill_one("Adapters", url, body={"utterances": DIALOGUE, "model": "tiny"})}
    finally:
        serve.delete("mer")
