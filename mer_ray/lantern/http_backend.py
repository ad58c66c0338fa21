"""The ``ray_data_http`` prompt-job backend: Lantern queries through ``ray.data.llm``'s HTTP processor.

Each (query, label, label token) becomes one completions request to an OpenAI-compatible
server; Ray Data's ``HttpRequestProcessorConfig`` + ``build_processor`` do the batching,
the concurrency, the rate limit (``qps``) and the retries (``max_retries``). The driver
sums each label's token log-probabilities, normalises over the label set (exactly as
:class:`~mer_ray.llm.llamacpp.LlamaCppScorer`), and writes result parts in the prompt
job's schema, so resume, ``summary.json`` and fusion work unchanged.

Two request shapes, both exact for multi-token labels (see ``mer_ray/llm/openai_http.py``):

- ``forced`` (llama-cpp-python's ``llama_cpp.server``): per label token ``t_k``, prompt
  ``prompt + t_<k``, ``max_tokens=1``, ``logprobs=1``, ``logit_bias={t_k: 100}``; the
  reported log-prob comes from the unbiased logits. Its ``echo`` log-probs cannot be used:
  they are off by one for models without BOS, and it sorts the whole vocabulary per echoed
  token (minutes per request with Gemma's 262k vocabulary).
- ``echo`` (vLLM and servers with OpenAI semantics): one request per label, ``prompt +
  label`` with ``echo``, and the echoed log-probs of the label's own characters are summed.

Label tokens come from the model's own GGUF vocabulary (``tokenizer``), where each label
actually follows the prompt; the server's reported prompt length checks that it saw the
same tokens.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from mer_ray.config import StrictModel
from mer_ray.lantern.job import RESULT_SCHEMA, read_results, summarise, write_part
from mer_ray.llm.base import label_continuations, normalise


class HttpBackendConfig(StrictModel):
    """``backend: ray_data_http``: the server, and how Ray Data's HTTP processor talks to it."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="OpenAI-compatible endpoint (…/v1)")
    model: str = Field("gemma3", description="the served model name (the request's ``model``)")
    tokenizer: str = Field("gemma3-270m", description="GGUF path or embedded name of the served model: "
                                                      "its vocabulary splits labels, its chat template wraps prompts")
    chat: bool = Field(True, description="wrap prompts in the tokenizer GGUF's chat template")
    mode: Literal["forced", "echo"] = Field("forced", description="'forced' (llama_cpp.server) or 'echo' (vLLM)")
    concurrency: int = Field(1, ge=1, description="HTTP stage actors (requests in flight = actors x batches)")
    batch_size: int = Field(64, ge=1, description="requests per HTTP stage batch")
    qps: int | None = Field(None, ge=1, description="requests per second per actor; null: sequential in a batch")
    max_retries: int = Field(3, ge=0, description="retries of a request (5xx, 408, 429, connection errors)")
    retry_wait_s: float = Field(1.0, gt=0, description="base of the exponential back-off between retries")
    timeout_s: float = Field(300.0, gt=0, description="seconds per request")
    api_key: str | None = Field(None, description="bearer token, if the server wants one")
    align_prefix: int | None = Field(8, ge=1, description="forced mode: before each prompt, a 1-token request that "
                                     "makes llama_cpp.server's prefix reuse cut on a multiple of this (null: off)")


class _Vocab:
    """The served model's tokenizer, read from its GGUF (vocabulary only, no weights)."""

    def __init__(self, gguf: str):
        from llama_cpp import Llama

        from mer_ray.assets import gguf_path

        self.llm = Llama(model_path=str(gguf_path(gguf)), vocab_only=True, verbose=False)
        b = self.llm.token_bos()
        self.bos = self.llm.detokenize([b], special=True).decode("utf-8", "ignore") if b >= 0 else ""

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        # as LlamaCppScorer.tokenize: chat markers parse as special tokens, never a double BOS
        if add_bos and self.bos and text.startswith(self.bos):
            add_bos = False
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def text(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "ignore")


def _lcp(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _primer(vocab: _Vocab, prev: list[int], base: list[int], align: int) -> tuple[str, list[int]] | None:
    """A request that makes a single-slot server cut its KV reuse for ``base`` on a multiple of ``align``.

    ``llama_cpp.server`` keeps the longest common prefix with the previous request and evaluates
    the rest as one batch. Cut at an arbitrary position, that batch gives other logits (by up to
    0.1 in log-prob with Gemma 3's CPU kernels) than a fresh evaluation; cut on a multiple of 8 it
    gives the same ones (see ``LlamaCppScorer.score_one``). The primer is ``base[:c]`` plus one
    special token, so the next request (``base``) shares exactly ``c`` tokens with it.
    Returns (prompt text without BOS, its tokens), or ``None`` when no aligned cut is available.
    """
    marker = vocab.llm.token_eos()
    lcp = _lcp(prev, base)
    if lcp < len(base) and lcp % align == 0:
        return None  # the server's own cut is already aligned (0: the run's first request, a fresh server)
    c = min(lcp, len(base) - 1)
    c -= c % align
    while c > 0:
        text = vocab.text(base[1 if vocab.bos else 0:c]) + vocab.llm.detokenize([marker], special=True).decode("utf-8", "ignore")
        toks = vocab.tokenize(text)
        if toks[:c] == base[:c] and toks[c:] == [marker] and base[c] != marker:
            return text, toks
        c -= align  # the prefix's text did not tokenise back to the same tokens: cut earlier
    return None


def build_requests(queries: pa.Table, labels: list[str], cfg: HttpBackendConfig) -> tuple[list[dict], dict[str, str]]:
    """One row per request (``payload`` plus what the postprocess checks), and queries that cannot be sent.

    Returns:
        (request rows, {query_id: error} for queries failed before any request).
    """
    vocab = _Vocab(cfg.tokenizer)
    rows, failed = [], {}
    prev: list[int] = []  # the tokens the server holds after the previous request, if requests keep their order
    for qid, prompt in zip(queries["query_id"].to_pylist(), queries["prompt"].to_pylist()):
        # The server adds BOS itself; sending its text too would make a double BOS.
        text = prompt[len(vocab.bos):] if vocab.bos and prompt.startswith(vocab.bos) else prompt
        base = vocab.tokenize(prompt)
        try:
            lab_toks = label_continuations(vocab.tokenize, prompt, labels)
        except ValueError as e:
            failed[qid] = f"label tokens: {e}"
            continue
        if cfg.mode == "echo":
            for j, lab in enumerate(labels):
                body = {"prompt": text + lab, "max_tokens": 1, "echo": True, "logprobs": 1}
                rows.append({"query_id": qid, "label_idx": j, "n_prompt": len(base), "k": 0, "want_token": "",
                             "want_prompt_tokens": -1, "char_start": len(text), "char_end": len(text) + len(lab),
                             "payload": body})
            continue
        # Order, for a server that keeps the previous request's KV cache (llama_cpp.server always
        # does): every label's first token first (the same prompt again: its logits are reused, not
        # recomputed), then each label's later tokens in turn, so each one is evaluated alone after
        # its prefix, as LlamaCppScorer's trie walk does; other orders change the batch shapes.
        order = [(j, 0) for j in range(len(labels))] + [(j, k) for j, t in enumerate(lab_toks) for k in range(1, len(t))]
        if cfg.align_prefix:
            primer = _primer(vocab, prev, base, cfg.align_prefix)
            if primer is not None:
                rows.append({"query_id": qid, "label_idx": -1, "n_prompt": len(base), "k": 0, "want_token": "",
                             "want_prompt_tokens": -1, "char_start": -1, "char_end": -1,
                             "payload": {"prompt": primer[0], "max_tokens": 1}})
                prev = primer[1]
        for j, k in order:
            toks = lab_toks[j]
            body = {"prompt": text + (vocab.text(toks[:k]) if k else ""), "max_tokens": 1, "logprobs": 1,
                    "logit_bias": {str(toks[k]): 100.0}}
            rows.append({"query_id": qid, "label_idx": j, "n_prompt": len(base), "k": k,
                         "want_token": vocab.text([toks[k]]), "want_prompt_tokens": len(base) + k,
                         "char_start": -1, "char_end": -1, "payload": body})
            prev = base + toks[:k]
    for i, r in enumerate(rows):
        # ``user`` (a standard field) makes every body unique, so the session counts attempts per request.
        # Bodies travel as JSON text: Ray Data stores a column of dicts as one Arrow struct (the union of
        # all rows' keys, null-filled), which would turn each ``logit_bias`` map into every row's keys.
        r["payload"] = {"json": json.dumps({**r["payload"], "model": cfg.model, "temperature": 0.0, "user": f"mer-{i}"})}
    return rows, failed


def read_response(row: dict) -> dict:
    """Postprocess of the HTTP processor: one request's label-token log-prob, or its error."""
    out = {k: row[k] for k in ("query_id", "label_idx", "k", "n_prompt")}
    out.update(logprob=float("nan"), error=None, prompt_tokens=0)
    try:
        if row["http_response"]["mer_error"]:
            raise RuntimeError(row["http_response"]["mer_error"])
        resp = json.loads(row["http_response"]["text"])
        if resp.get("error"):  # a server's JSON error body
            raise RuntimeError(f"server error: {json.dumps(resp['error'])[:300]}")
        out["prompt_tokens"] = int((resp.get("usage") or {}).get("prompt_tokens") or 0)
        if row["label_idx"] < 0:  # a primer: nothing to read
            return out
        lp = resp["choices"][0]["logprobs"]
        if row["char_start"] >= 0:  # echo: the echoed tokens that start inside the label
            idx = [i for i, o in enumerate(lp["text_offset"]) if row["char_start"] <= o < row["char_end"]]
            vals = [lp["token_logprobs"][i] for i in idx]
            if not idx or any(v is None for v in vals):
                raise RuntimeError("the server echoed no log-probs for the label (echo with logprobs unsupported?)")
            out["logprob"] = float(sum(vals))
        else:
            if lp["tokens"][0] != row["want_token"]:
                raise RuntimeError(f"forced token {row['want_token']!r} but the server generated {lp['tokens'][0]!r}")
            if out["prompt_tokens"] and out["prompt_tokens"] != row["want_prompt_tokens"]:
                raise RuntimeError(f"the server tokenised the prompt into {out['prompt_tokens']} tokens, "
                                   f"expected {row['want_prompt_tokens']}")
            out["logprob"] = float(lp["token_logprobs"][0])
    except Exception as e:
        out["error"] = f"backend error: {type(e).__name__}: {e}" if not str(e).startswith("HTTP") else str(e)
    return out


class _Reply:
    """The part of an aiohttp response that Ray's ``HttpRequestUDF`` reads."""

    def __init__(self, text: str | None = None, error: str | None = None, status: int = 200, reason: str = "OK"):
        # one fixed shape, whatever the server said (see build_requests on Arrow structs)
        self.body, self.status, self.reason = {"text": text, "mer_error": error}, status, reason

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False

    async def json(self):
        return self.body


class FinalAttemptSession:
    """Session for Ray's HTTP stage (``session_factory``): a request's last failed attempt becomes a row.

    Ray's stage retries 408/429/502/503/504 and connection errors, then raises, which would
    fail the whole dataset. Here every 5xx (500 included), 408 and 429 is retried by Ray (reported
    to it as 503) and, on the attempt after ``max_retries`` retries, answered with
    ``{"mer_error": ...}``, which the postprocess turns into a ``failed`` query. Responses reach
    the postprocess as ``{"text": raw body, "mer_error": None}``. Other 4xx
    (e.g. a context overflow) are request errors: recorded at once, not retried.
    """

    def __init__(self, max_retries: int, timeout_s: float, api_key: str | None = None):
        self.max_retries, self.timeout_s, self.api_key = max_retries, timeout_s, api_key
        self._attempts: Counter = Counter()

    async def __aenter__(self):
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s), headers=headers)
        return self

    async def __aexit__(self, *exc):
        await self._session.close()
        return False

    def post(self, url, headers=None, data=None):
        return self._attempt(url, headers, data)

    async def _attempt(self, url, headers, data) -> _Reply:
        import aiohttp

        data = json.loads(data)["json"]  # the body as build_requests wrote it
        self._attempts[data] += 1
        last = self._attempts[data] > self.max_retries
        try:
            async with self._session.post(url, headers=headers, data=data) as r:
                status, text = r.status, await r.text()
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            if last:
                return _Reply(error=f"HTTP connection failed after {self.max_retries} retries: {type(e).__name__}: {e}")
            raise aiohttp.ClientConnectionError(f"{type(e).__name__}: {e}") from e  # Ray backs off and retries
        if status == 200:
            return _Reply(text)
        if status >= 500 or status in (408, 429):
            if not last:
                return _Reply(status=503, reason=f"HTTP {status}")
            return _Reply(error=f"HTTP {status} after {self.max_retries} retries: {text[:300]}")
        return _Reply(error=f"HTTP {status}: {text[:300]}")


def processor_config(cfg: HttpBackendConfig):
    """The ``HttpRequestProcessorConfig`` of a backend config."""
    from ray.data.llm import HttpRequestProcessorConfig

    return HttpRequestProcessorConfig(
        url=cfg.base_url.rstrip("/") + "/completions", batch_size=cfg.batch_size, concurrency=cfg.concurrency,
        qps=cfg.qps, max_retries=cfg.max_retries, base_retry_wait_time_in_s=cfg.retry_wait_s,
        session_factory=functools.partial(FinalAttemptSession, cfg.max_retries, cfg.timeout_s, cfg.api_key))


def _result_row(qid: str, parts: list[dict], n_labels: int, seconds: float) -> dict:
    # ``seconds``: from the job's start to this query's last reply (requests of many queries overlap,
    # so a per-query time is not defined); ``tokens_evaluated``: prompt tokens the requests asked for.
    tokens = sum(p["prompt_tokens"] for p in parts)
    parts = [p for p in parts if p["label_idx"] >= 0]  # a primer's answer (or failure) does not score anything
    errors = sorted((p["label_idx"], p["k"], p["error"]) for p in parts if p["error"])
    row = {"query_id": qid, "status": "ok", "error": None, "llm_probs": None, "llm_logprobs": None,
           "n_prompt_tokens": parts[0]["n_prompt"], "tokens_evaluated": tokens,
           "tokens_reused": 0, "seconds": seconds}
    if errors:
        return {**row, "status": "failed", "error": errors[0][2]}
    lps = np.full(n_labels, -np.inf)
    for j in range(n_labels):
        # the same float64 additions as the in-process trie walk: t_1, then t_2, ... in order
        total = 0.0
        for p in sorted((p for p in parts if p["label_idx"] == j), key=lambda p: p["k"]):
            total = total + p["logprob"]
        lps[j] = total
    return {**row, "llm_probs": normalise(lps).astype(np.float32).tolist(), "llm_logprobs": lps.tolist()}


def run_http_prompt_job(queries: pa.Table, out_dir: str | Path, cfg: HttpBackendConfig | dict, labels: list[str],
                        retry_failed: bool = True, part_size: int = 200, progress: bool = True) -> dict:
    """Score every query not already ``ok`` in ``out_dir`` through the HTTP processor; returns the summary.

    Ray must be initialised by the caller. A query's requests may arrive in any order and
    across output batches; its row is written once all of them have arrived.
    """
    import ray
    from ray.data.llm import build_processor

    cfg = HttpBackendConfig.model_validate(cfg)
    out_dir = Path(out_dir)
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    pq.write_table(queries, out_dir / "queries.parquet")
    done = read_results(out_dir)
    skip = {q for q, s in zip(done["query_id"].to_pylist(), done["status"].to_pylist()) if s == "ok" or not retry_failed}
    todo = queries.filter(pa.array([q not in skip for q in queries["query_id"].to_pylist()], pa.bool_()))
    t0 = time.perf_counter()
    run_id = time.strftime("%Y%m%d%H%M%S") + "-" + uuid.uuid4().hex[:6]
    rows, failed = build_requests(todo, labels, cfg)
    pending: dict[str, list[dict]] = {}
    need = Counter(r["query_id"] for r in rows)
    ready = [_failed_row(q, e) for q, e in failed.items()]
    n_written, n_part = 0, 0

    def flush(force: bool = False):
        nonlocal ready, n_written, n_part
        if ready and (force or len(ready) >= part_size):
            n_written += write_part(out_dir, pa.Table.from_pylist(ready, schema=RESULT_SCHEMA), run_id, n_part)
            n_part, ready = n_part + 1, []

    bar = None
    if progress and rows:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="lantern http requests", unit="req")
    if rows:
        proc = build_processor(processor_config(cfg), postprocess=read_response)
        ds = proc(ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // cfg.batch_size, 64))))
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for r in batch.to_pylist():
                pending.setdefault(r["query_id"], []).append(r)
                if len(pending[r["query_id"]]) == need[r["query_id"]]:
                    ready.append(_result_row(r["query_id"], pending.pop(r["query_id"]), len(labels),
                                             time.perf_counter() - t0))
            if bar:
                bar.update(batch.num_rows)
            flush()
    flush(force=True)
    if bar:
        bar.close()
    return summarise(queries, out_dir, todo, n_written, time.perf_counter() - t0)


def _failed_row(qid: str, error: str) -> dict:
    return {"query_id": qid, "status": "failed", "error": error, "llm_probs": None, "llm_logprobs": None,
            "n_prompt_tokens": 0, "tokens_evaluated": 0, "tokens_reused": 0, "seconds": 0.0}
