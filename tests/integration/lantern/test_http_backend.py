"""The ``ray_data_http`` backend: a real llama-cpp-python server on Gemma 3 270M, and a server that fails."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest

from mer_ray.lantern.http_backend import HttpBackendConfig, run_http_prompt_job
from mer_ray.lantern.job import read_results, run_prompt_job
from mer_ray.lantern.queries import build_queries
from mer_ray.llm.llamacpp_server import free_port
from mer_ray.llm.prompts import PromptTemplate

pytestmark = [pytest.mark.slow, pytest.mark.ray]
# "exasperation" is several Gemma tokens after "Emotion:": the exact multi-token path is exercised
LABELS = ["neutral", "joy", "surprise", "anger", "sadness", "exasperation", "fear"]
LINES = [("Ross", "We were on a break!"), ("Rachel", "I cannot believe you said that."),
         ("Ross", "It's true, though."), ("Monica", "Guys, please, not again."), ("Joey", "How you doin'?")]
N_CTX, N_BATCH = 1024, 512


def _queries(n: int) -> tuple[pa.Table, list[str]]:
    from mer_ray.llm.backends import prompt_format_for

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(LABELS)), len(LINES)).astype(np.float32)
    van = pa.table({"dialogue_id": ["d1"] * len(LINES), "turn": list(range(len(LINES))),
                    "speaker": [s for s, _ in LINES], "text": [t for _, t in LINES], "split": ["dev"] * len(LINES),
                    "emotion_probs": pa.array(list(probs), pa.list_(pa.float32()))})
    van = van.replace_schema_metadata({"emotion_labels": json.dumps(LABELS)})
    chat, bos, eos = prompt_format_for({"kind": "llama_cpp", "model": "gemma3-270m"})
    tpl = PromptTemplate.load()
    q = build_queries(van, tpl, [4], stride=4, chat_template=chat, bos_token=bos, eos_token=eos)
    return q.slice(0, n), tpl.labels(LABELS, chat is not None)


@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory):
    """``llama_cpp.server`` on the packaged Gemma with the in-process scorer's settings, RAM cache off."""
    from mer_ray.llm.llamacpp_server import llama_server

    log = tmp_path_factory.mktemp("srv") / "server.log"
    try:
        with llama_server("gemma3-270m", log, n_ctx=N_CTX, n_batch=N_BATCH, n_threads=1) as url:
            yield url
    except RuntimeError as e:
        pytest.fail(str(e))


def _by_id(out_dir) -> dict[str, dict]:
    return {r["query_id"]: r for r in read_results(out_dir).to_pylist()}


def test_http_backend_matches_the_in_process_scorer(gemma_server, ray_local, tmp_path):
    q, labels = _queries(4)
    # one batch, one actor: requests reach the server in a fixed order
    cfg = HttpBackendConfig(base_url=gemma_server, model="gemma3", concurrency=1, batch_size=1000, max_retries=0)
    s_http = run_http_prompt_job(q, tmp_path / "http", cfg, labels, progress=False)
    assert s_http["ok"] == q.num_rows and s_http["missing"] == 0
    backend = {"kind": "llama_cpp", "model": "gemma3-270m", "n_threads": 1, "n_ctx": N_CTX, "reuse_prefix": False}
    s_loc = run_prompt_job(q, tmp_path / "local", backend, labels, progress=False)
    assert s_loc["ok"] == q.num_rows
    http, loc = _by_id(tmp_path / "http"), _by_id(tmp_path / "local")
    from mer_ray.lantern.http_backend import _Vocab
    from mer_ray.llm.base import label_continuations

    lab_toks = label_continuations(_Vocab("gemma3-270m").tokenize, q["prompt"][0].as_py(), labels)
    assert max(len(t) for t in lab_toks) > 1  # a multi-token label is scored
    diffs = []
    for qid, r in loc.items():
        a, b = np.array(http[qid]["llm_logprobs"]), np.array(r["llm_logprobs"])
        assert http[qid]["n_prompt_tokens"] == r["n_prompt_tokens"]
        # Both sides: the same llama.cpp logits (same n_batch, threads and evaluation cuts), the same
        # float32 log-softmax (llama-cpp-python's Llama.logits_to_logprobs), the same float64 sums in
        # token order. One computation, so equality is exact on any CPU.
        np.testing.assert_array_equal(a, b)
        diffs.append(np.abs(a - b).max())
    print(f"\nHTTP vs in-process, caches off: max |label log-prob diff| {max(diffs):.3g}")
    # with the in-process prefix reuse on (the server always reuses the previous request's prefix)
    s_reuse = run_prompt_job(q, tmp_path / "reuse", {**backend, "reuse_prefix": True}, labels, progress=False)
    reuse = _by_id(tmp_path / "reuse")
    d = max(np.abs(np.array(http[k]["llm_logprobs"]) - np.array(reuse[k]["llm_logprobs"])).max() for k in reuse)
    print(f"HTTP vs in-process with prefix reuse on: max |label log-prob diff| {d:.3g}; "
          f"tokens evaluated in process {s_reuse['tokens_evaluated']} (reuse) vs {s_loc['tokens_evaluated']}; "
          f"tokens requested over HTTP {s_http['tokens_evaluated']}; wall http {s_http['wall_seconds']:.1f} s, "
          f"in process {s_loc['wall_seconds']:.1f} s")


class _FlakyServer(BaseHTTPRequestHandler):
    """Stands for an outside server: 500 when the target line names ``fail_marker``, else a well-formed forced reply."""

    fail_marker = "Monica"
    calls = 0
    vocab = None

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        n = len(self.vocab.tokenize(body["prompt"]))
        if "logit_bias" not in body:  # a primer (HttpBackendConfig.align_prefix): nothing to score
            self._send(200, json.dumps({"choices": [{"text": "", "logprobs": None}], "usage": {"prompt_tokens": n}}).encode())
            return
        if self.fail_marker and self.fail_marker in body["prompt"].rsplit("\n", 2)[-2]:  # the target's line
            self._send(500, b"Internal Server Error")
            return
        (tok,) = body["logit_bias"]
        reply = {"choices": [{"text": "", "logprobs": {"tokens": [self.vocab.text([int(tok)])], "token_logprobs": [-1.0]}}],
                 "usage": {"prompt_tokens": n}}
        self._send(200, json.dumps(reply).encode())

    def _send(self, code, data):
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_http_500_after_max_retries_is_a_failed_row_and_resume_retries_it(ray_local, tmp_path):
    from mer_ray.lantern.http_backend import _Vocab, build_requests

    q, labels = _queries(8)
    _FlakyServer.vocab = _Vocab("gemma3-270m")
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), _FlakyServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = HttpBackendConfig(base_url=f"http://127.0.0.1:{srv.server_port}/v1", max_retries=2,
                                retry_wait_s=0.01, batch_size=16, concurrency=1)
        s1 = run_http_prompt_job(q, tmp_path, cfg, labels, progress=False)
        res = _by_id(tmp_path)
        failed = {k for k, r in res.items() if r["status"] == "failed"}
        targets = dict(zip(q["query_id"].to_pylist(), q["target_pos"].to_pylist()))
        assert failed == {k for k, t in targets.items() if LINES[t][0] == "Monica"}  # the target is Monica's line
        assert all(res[k]["error"].startswith("HTTP 500 after 2 retries") for k in failed)
        assert s1["queries"] == q.num_rows == s1["ok"] + s1["failed"] and s1["missing"] == 0
        assert set(s1["failed_by_reason"]) == {"HTTP 500 after 2 retries"}
        rows, _ = build_requests(q, labels, cfg)
        n_fail = sum(r["query_id"] in failed and r["label_idx"] >= 0 for r in rows)
        assert _FlakyServer.calls == len(rows) - n_fail + 3 * n_fail  # each failing request: 1 try + 2 retries
        # the server recovers: a re-run scores only the failed queries
        _FlakyServer.fail_marker = None
        s2 = run_http_prompt_job(q, tmp_path, cfg, labels, progress=False)
        assert s2["skipped_done"] == s1["ok"] and s2["ok"] == q.num_rows and s2["failed"] == 0
    finally:
        srv.shutdown()


def test_unreachable_server_fails_every_query_without_failing_the_job(ray_local, tmp_path):
    q, labels = _queries(2)
    cfg = HttpBackendConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, retry_wait_s=0.01)
    s = run_http_prompt_job(q, tmp_path, cfg, labels, progress=False)
    assert s["queries"] == s["failed"] == q.num_rows and s["missing"] == 0
    assert set(s["failed_by_reason"]) == {"HTTP connection failed after 1 retries"}
