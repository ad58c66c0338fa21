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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mer_ray.assets import smollm2_gguf

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("srv") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()),
                             "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                             "--n_ctx", "512", "--n_threads", "1", "--logits_all", "true"],
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


def test_http_scores_match_llama_cpp_exactly_per_label(server):
    from mer_ray.llm.llamacpp import LlamaCppScorer
    from mer_ray.llm.openai_http import OpenAICompletionsScorer

    http = OpenAICompletionsScorer(server, "smollm2", max_workers=2, mode="forced")
    local = LlamaCppScorer("smollm2-135m-instruct", n_ctx=512, n_threads=1)
    got = http.score(PROMPTS, LABELS)
    want = local.score(PROMPTS, LABELS)
    for g, w in zip(got, want):
        assert g.ok, g.error
        assert g.probs.shape == (len(LABELS),) and g.probs.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-3)
        assert int(np.argmax(g.probs)) == int(np.argmax(w.probs))
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
    np.testing.assert_allclose(r.logprobs, want)
    assert r.probs.sum() == pytest.approx(1.0)
