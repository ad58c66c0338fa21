"""A real request to a running service, printed for a person (``make demo``'s last step)."""

from __future__ import annotations

DEMO_DIALOGUE = [
    {"speaker": "Rachel", "text": "Guess what? I got the job at Ralph Lauren!"},
    {"speaker": "Monica", "text": "Oh my God, that's wonderful! I'm so happy for you!"},
    {"speaker": "Ross", "text": "Wait, you're moving to Paris? Since when?"},
    {"speaker": "Rachel", "text": "I'm sorry I didn't tell you earlier. I was scared of how you'd take it."},
]


def demo_request(url: str = "http://127.0.0.1:8000", use_llm: bool = True, api_key: str | None = None,
                 timeout_s: float = 300.0, echo: bool = True) -> dict:
    """POST :data:`DEMO_DIALOGUE` to ``{url}/v1/recognize``, print each turn's answer, return the response JSON."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(f"{url.rstrip('/')}/v1/recognize", json={"utterances": DEMO_DIALOGUE, "use_llm": use_llm},
                   headers=headers, timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"{url}/v1/recognize answered {r.status_code}: {r.text[:500]}")
    out = r.json()
    if echo:
        print(f"POST {url.rstrip('/')}/v1/recognize  (label set {out['label_set']}, use_llm={use_llm})")
        for u, p in zip(DEMO_DIALOGUE, out["utterances"]):
            top = sorted(p["probs"].items(), key=lambda kv: -kv[1])[:2]
            extra = f"  llm fields {p['receptive_fields']}" if p["llm"] is not None else ""
            print(f"  {u['speaker']:>7}: {u['text'][:58]:<58} -> {p['label']:<8} "
                  + " ".join(f"{k} {v:.2f}" for k, v in top) + extra)
        print("  timing_ms: " + ", ".join(f"{k} {v:.0f}" for k, v in out["timing_ms"].items()))
        print(f"Service: {url}   API docs: {url.rstrip('/')}/docs   OpenAPI: {url.rstrip('/')}/openapi.json")
    return out


def serve_demo(models_dir: str, port: int = 8000, use_llm: bool = True, stop: bool = True) -> str:
    """Start the service on ``models_dir`` (on the Ray this process has, or a new local one), send
    :data:`DEMO_DIALOGUE`, print the answer and the URL; shut Serve down after unless ``stop`` is False."""
    from mer_ray.serve.run import serve_local

    url = serve_local(models_dir=str(models_dir), port=port, no_llm=not use_llm)
    try:
        demo_request(url, use_llm=use_llm)
    finally:
        if stop:
            from ray import serve

            serve.shutdown()
    return url
