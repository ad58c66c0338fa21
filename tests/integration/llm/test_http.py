"""OpenAI-compatible HTTP backend against a real llama-cpp-python server on 127.0.0.1 (SmolLM2)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow
LABELS = [" neutral", " joy", " surprise", " anger", " sadness", " disgust", " fear"]
PROMPTS = ['Ross: "We were on a break!"\nRachel: "I cannot believe you said that."\nThe emotion of Rachel is',
           'Joey: "How you doin\'?"\nThe emotion of Joey is']


def _server_settings():
    """The server's model settings; the reference Llama is built from the same object, so both
    run llama.cpp with the same context parameters (threads, n_batch, n_ubatch, logits_all, ...)."""
    from llama_cpp.server.settings import ModelSettings

    from mer_ray.assets import smollm2_gguf

    return ModelSettings(model=str(smollm2_gguf()), model_alias="smollm2", n_ctx=512, n_threads=1,
                         n_threads_batch=1, logits_all=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ms = _server_settings()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("srv") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", ms.model,
                             "--model_alias", ms.model_alias, "--host", "127.0.0.1", "--port", str(port),
                             "--n_ctx", str(ms.n_ctx), "--n_threads", str(ms.n_threads),
                             "--n_threads_batch", str(ms.n_threads_batch), "--logits_all", "true"],
                            stdout=log, stderr=subprocess.STDOUT)
    import httpx

    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama_cpp.server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not start in 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _reference_forced(prompts, labels):
    """What the server computes for the forced-mode requests, replayed in process.

    llama.cpp's logits depend on the batch shapes evaluated (by a CPU-dependent amount), and the
    server evaluates each request's prompt as one ``logits_all`` batch after reusing the prefix it
    shares with the previous request. So the reference is a Llama with the server's settings fed
    the same request sequence (``create_completion`` keeps its KV cache as the server's), and the
    log-prob of ``t_k`` is read from the raw (unbiased) logits of the last prompt position, after
    checking that position holds exactly ``prompt + t_<k``.
    """
    from llama_cpp import Llama
    from llama_cpp.server.model import LlamaProxy

    ref = LlamaProxy.load_llama_from_model_settings(_server_settings())
    out = []
    for prompt in prompts:
        row = []
        for lab in labels:
            base = ref.tokenize(prompt.encode("utf-8"), special=True)
            full = ref.tokenize((prompt + lab).encode("utf-8"), special=True)
            lab_toks = full[len(base):]
            total = 0.0
            for k, tok in enumerate(lab_toks):
                text = prompt + (ref.detokenize(lab_toks[:k]).decode("utf-8") if k else "")
                ref.create_completion(text, max_tokens=1, logprobs=1, temperature=0.0, logit_bias={str(tok): 100.0})
                n = ref.n_tokens  # the prompt tokens evaluated (the sampled token is not)
                assert ref.input_ids[:n].tolist() == full[:len(base) + k]
                # the server's own float32 log-softmax over its score rows, then row n-1
                total += float(Llama.logits_to_logprobs(ref._scores)[n - 1][tok])
            row.append(total)
        out.append(np.array(row))
    return out


def test_http_scores_match_llama_cpp_exactly_per_label(server):
    from mer_ray.llm.llamacpp import LlamaCppScorer
    from mer_ray.llm.openai_http import OpenAICompletionsScorer

    # One worker: the server's prefix cache makes each request's batch shapes (so its logits, in the
    # last bits) depend on the request before it; sequential requests make that order fixed.
    http = OpenAICompletionsScorer(server, "smollm2", max_workers=1, mode="forced")
    got = http.score(PROMPTS, LABELS)
    want = _reference_forced(PROMPTS, LABELS)
    # The local scorer evaluates other batch shapes (logits_all=False, aligned prefix reuse), so only
    # its integer results are compared: the prompt is tokenised the same way.
    local = LlamaCppScorer("smollm2-135m-instruct", n_ctx=512, n_threads=1).score(PROMPTS, LABELS)
    for g, w, loc in zip(got, want, local):
        assert g.ok, g.error
        assert g.probs.shape == (len(LABELS),)
        # softmax of 7 float64 values: |sum - 1| <= ~20 * 2**-53 (7 rounded quotients, two 7-term sums)
        assert abs(g.probs.sum() - 1.0) <= 1e-12
        # identical llama.cpp computation, float32 values sent as JSON doubles, summed in the same order
        np.testing.assert_array_equal(g.logprobs, w)
        assert g.n_prompt_tokens == loc.n_prompt_tokens
        assert g.tokens_evaluated - g.n_prompt_tokens == sum(len(t) for t in loc.label_tokens)
    # a label that is several tokens is summed over all of them, not read from a top-k list
    many = http.forced_label_logprob(PROMPTS[1], " exhilarated")
    assert many[1] > 1


def test_http_backend_error_is_recorded_not_raised():
    from mer_ray.llm.openai_http import OpenAICompletionsScorer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = OpenAICompletionsScorer(f"http://127.0.0.1:{port}/v1", "none", max_workers=1).score(["x"], LABELS)
    assert not r[0].ok and r[0].error.startswith("backend error")


def test_echo_mode_sums_exactly_the_label_tokens():
    """Echo mode against an endpoint with OpenAI echo semantics (as vLLM): a word-level stand-in."""
    import json as _json

    import httpx

    from mer_ray.llm.openai_http import OpenAICompletionsScorer

    def logprob(prefix: str, token: str) -> float:  # a fixed, known 'model'
        return -0.1 * (len(token) + len(prefix) % 7)

    def handler(request: httpx.Request) -> httpx.Response:
        body = _json.loads(request.content)
        text = body["prompt"]
        # tokens: words with their leading space; first token has no logprob, as in the API
        toks, offs, pos = [], [], 0
        for i, w in enumerate(text.split(" ")):
            t = w if i == 0 else " " + w
            toks.append(t)
            offs.append(pos)
            pos += len(t)
        lps = [None] + [logprob(text[:o], t) for t, o in zip(toks[1:], offs[1:])]
        toks.append(" X")
        offs.append(len(text))
        lps.append(-9.0)  # the generated token: must be ignored
        return httpx.Response(200, json={"choices": [{"text": text + " X", "logprobs": {
            "tokens": toks, "text_offset": offs, "token_logprobs": lps, "top_logprobs": None}}]})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    sc = OpenAICompletionsScorer("http://vllm.invalid/v1", "m", client=client, max_workers=1)
    prompt = "The emotion is"
    r = sc.score([prompt], [" joy", " deep sadness"])[0]
    assert r.ok
    want = [logprob(prompt, " joy"), logprob(prompt, " deep") + logprob(prompt + " deep", " sadness")]
    np.testing.assert_array_equal(r.logprobs, want)  # the same float64 additions, in the same order
    assert abs(r.probs.sum() - 1.0) <= 1e-12  # softmax of 2 float64 values: within a few ulp of 1
