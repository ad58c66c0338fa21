"""A client of a running service: POST a dialogue to ``/v1/recognize`` and print the answer for a person."""

from __future__ import annotations

#: A sample request (``mer serve --demo-request``): four turns, from joy to surprise and fear.
SAMPLE_DIALOGUE = [
    {"speaker": "Rachel", "text": "Guess what? I got the job at Ralph Lauren!"},
    {"speaker": "Monica", "text": "Oh my God, that's wonderful! I'm so happy for you!"},
    {"speaker": "Ross", "text": "Wait, you're moving to Paris? Since when?"},
    {"speaker": "Rachel", "text": "I'm sorry I didn't tell you earlier. I was scared of how you'd take it."},
]


def recognize(url: str = "http://127.0.0.1:8000", use_llm: bool = True, api_key: str | None = None,
              timeout_s: float = 300.0, echo: bool = True, utterances: list[dict] | None = None) -> dict:
    """POST :data:`SAMPLE_DIALOGUE` to ``{url}/v1/recognize``, print each turn's answer, return the response JSON."""
    import httpx

    utterances = SAMPLE_DIALOGUE if utterances is None else utterances
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(f"{url.rstrip('/')}/v1/recognize", json={"utterances": utterances, "use_llm": use_llm},
                   headers=headers, timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"{url}/v1/recognize answered {r.status_code}: {r.text[:500]}")
    out = r.json()
    if echo:
        print(format_answer(url, utterances, out, use_llm))
    return out


def format_answer(url: str, utterances: list[dict], out: dict, use_llm: bool) -> str:
    """A person's view of a ``/v1/recognize`` answer: each turn's label, top two probabilities, prediction set."""
    base = url.rstrip("/")
    cal = f"calibrated, prediction sets at alpha {out['alpha']}" if out.get("alpha") is not None else (
        "calibrated, no prediction sets" if out.get("calibrated") else "uncalibrated (no calibration.json): no prediction sets")
    lines = [f"POST {base}/v1/recognize  (label set {out['label_set']}, use_llm={use_llm}; {cal})"]
    for u, p in zip(utterances, out["utterances"]):
        top = sorted(p["probs"].items(), key=lambda kv: -kv[1])[:2]
        extra = f"  set {{{', '.join(p['prediction_set'])}}}" if p.get("prediction_set") else ""
        extra += f"  llm fields {p['receptive_fields']}" if p["llm"] is not None else ""
        lines.append(f"  {u['speaker']:>7}: {u['text'][:58]:<58} -> {p['label']:<8} " + " ".join(f"{k} {v:.2f}" for k, v in top) + extra)
    lines.append("  timing_ms: " + ", ".join(f"{k} {v:.0f}" for k, v in out["timing_ms"].items()))
    lines.append(f"Service: {base}   page: {base}/   API docs: {base}/docs   OpenAPI: {base}/openapi.json")
    return "\n".join(lines)
