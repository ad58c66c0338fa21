"""The page at ``GET /`` in a real browser: Debian's headless Chromium, driven by Playwright, on ``mer serve``.

The page is loaded from the server, a dialogue is pasted and submitted, and what the page shows (labels,
probabilities, prediction sets, the timeline) must be the API's own answer to the very request the page
sent, fetched again with httpx. Bad input must show the API's error message, never a blank page.
``MER_PAGE_SCREENSHOT=docs/img/page.png`` writes the README's screenshot (else it goes to a temp dir), and
``MER_PAGE_MODELS=DIR`` serves another models dir for it (``-k screenshot``: the other tests expect the tiny
calibration's label sets).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import httpx
import pytest

from tests.integration.serve.test_local_mode import MELD7
from tests.unit.serve.tiny_calibration import SET_LABEL_SETS

pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.slow]

DIALOGUE = "Ross: We were on a break!\nRachel: I can't believe you said that.\n\nRoss:   Okay, okay. I'm sorry.\nRachel: Sorry? That's it?\n"
TURNS = [{"speaker": "Ross", "text": "We were on a break!"}, {"speaker": "Rachel", "text": "I can't believe you said that."},
         {"speaker": "Ross", "text": "Okay, okay. I'm sorry."}, {"speaker": "Rachel", "text": "Sorry? That's it?"}]
# What the page shows of each turn, read from the DOM.
SHOWN = """els => els.map(e => ({
  label: e.dataset.label, speaker: e.querySelector('.speaker').textContent, text: e.querySelector('.text').textContent,
  set: e.querySelector('.set ul') ? [...e.querySelectorAll('.set li')].map(x => x.textContent) : null,
  probs: Object.fromEntries([...e.querySelectorAll('tr[data-label]')].map(r => [r.dataset.label, Number(r.dataset.p)]))}))"""
MARKS = """ms => ms.map(m => ({turn: +m.dataset.turn, label: m.dataset.label, speaker: m.dataset.speaker,
  bottom: +m.getAttribute('y') + +m.getAttribute('height')}))"""


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """The page, loaded from ``server``, with its label sets in; it must raise no JS error and fetch nothing from elsewhere."""
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    js_errors, elsewhere = [], []
    pg.on("pageerror", lambda e: js_errors.append(str(e)))
    pg.on("request", lambda r: None if r.url.startswith(server + "/") else elsewhere.append(r.url))
    r = pg.goto(server + "/")
    assert r.status == 200 and "text/html" in r.headers["content-type"]
    pg.wait_for_selector("body[data-ready]", state="attached")  # GET /v1/labels and /healthz answered
    assert pg.eval_on_selector_all("#label-set option", "os => os.length") > 1
    yield pg
    ctx.close()
    assert not js_errors and not elsewhere, (js_errors, elsewhere)


def submit(page) -> dict | str:
    """Click Recognize and wait for the page's answer; the body the page sent (parsed when it is JSON)."""
    with page.expect_response(lambda r: r.url.endswith("/v1/recognize")) as resp:
        page.click("#submit")
    page.wait_for_function("!document.getElementById('submit').disabled")
    body = resp.value.request.post_data
    try:
        return json.loads(body)
    except ValueError:
        return body


def recognize(server: str, body: dict | str) -> httpx.Response:
    kw = {"json": body} if isinstance(body, dict) else {"content": body, "headers": {"Content-Type": "application/json"}}
    return httpx.post(server + "/v1/recognize", timeout=60, **kw)


def check_shown_equals_answer(page, want: dict, turns: list[dict]):
    assert page.is_visible("#result") and not page.is_visible("#error")
    shown = page.eval_on_selector_all(".utt", SHOWN)
    assert [(s["speaker"], s["text"]) for s in shown] == [(t["speaker"], t["text"]) for t in turns]
    assert [s["label"] for s in shown] == [u["label"] for u in want["utterances"]]
    assert [s["set"] for s in shown] == [u["prediction_set"] for u in want["utterances"]]
    for s, u in zip(shown, want["utterances"]):
        assert list(s["probs"]) == want["labels"] and s["probs"] == pytest.approx(u["probs"], abs=1e-9)
    marks = page.eval_on_selector_all("#timeline svg .mark", MARKS)  # one mark per turn, on its speaker's row
    assert [m["turn"] for m in marks] == list(range(len(turns)))
    assert [(m["label"], m["speaker"]) for m in marks] == [(u["label"], t["speaker"]) for u, t in zip(want["utterances"], turns)]
    rows = {}
    for m, t in zip(marks, turns):
        rows.setdefault(t["speaker"], set()).add(round(m["bottom"], 3))
    assert all(len(v) == 1 for v in rows.values()) and len({v.pop() for v in rows.values()}) == len(rows)
    summary = page.inner_text("#summary")
    if want["calibrated"] and want["alpha"] is not None:
        assert f"α = {want['alpha']}" in summary and want["conformal"]["method"] in summary
    elif want["calibrated"]:
        assert f"calibrated probabilities · no prediction sets (no conformal scores for label set {want['label_set']}" in summary
    else:
        assert "uncalibrated: no prediction sets" in summary


def test_the_page_shows_the_apis_answer_to_the_request_it_sent(page, server):
    page.fill("#dialogue", DIALOGUE)
    assert page.is_disabled("#use-llm") and not page.is_checked("#use-llm")  # mer serve --no-llm: GET /healthz says llm: false
    sent = submit(page)
    assert sent == {"utterances": TURNS, "use_llm": False}
    want = recognize(server, sent)
    assert want.status_code == 200, want.text
    want = want.json()
    assert want["calibrated"] and all(u["prediction_set"] for u in want["utterances"]), "the tiny models' calibration is not served"
    check_shown_equals_answer(page, want, TURNS)
    # an alpha of its own: other sets
    page.fill("#alpha", "0.25")
    sent = submit(page)
    assert sent == {"utterances": TURNS, "use_llm": False, "alpha": 0.25}
    want = recognize(server, sent).json()
    assert want["alpha"] == 0.25
    check_shown_equals_answer(page, want, TURNS)
    # another label set from the selector, one the tiny calibration has no conformal scores for
    other = [v for v in page.eval_on_selector_all("#label-set option", "os => os.map(o => o.value)") if v and v not in SET_LABEL_SETS][0]
    page.select_option("#label-set", other)
    page.fill("#alpha", "")
    sent = submit(page)
    assert sent == {"utterances": TURNS, "use_llm": False, "label_set": other}
    want = recognize(server, sent).json()
    assert want["label_set"] == other and want["labels"] != MELD7 and want["calibrated"]
    assert all(u["prediction_set"] is None for u in want["utterances"])
    check_shown_equals_answer(page, want, TURNS)


BAD = [("empty text area", "", 422), ("unknown field", '{"utterances": [{"speaker": "A", "text": "hi"}], "stream": true}', 422),
       ("malformed JSON", '[{"speaker": "A", "text": "hi"},', 422), ("alpha outside the calibrated range", "A: hi", 422)]


@pytest.mark.parametrize("name, text, status", BAD, ids=[b[0] for b in BAD])
def test_bad_input_shows_the_apis_error_message(page, server, name, text, status):
    page.fill("#dialogue", text)
    if name.startswith("alpha"):
        page.fill("#alpha", "0.9")
    sent = submit(page)
    want = recognize(server, sent)
    assert want.status_code == status, want.text
    page.wait_for_selector("#error:not([hidden])")
    shown = page.inner_text("#error")
    assert want.json()["error"] in shown and f"HTTP {status}" in shown, shown
    assert not page.is_visible("#result")


def test_a_line_that_is_not_speaker_text_and_a_network_failure_are_shown(page, server):
    page.fill("#dialogue", "Ross: hi\nthis line has no speaker")
    page.click("#submit")
    assert 'Line 2 is not "Speaker: text"' in page.inner_text("#error")
    page.fill("#dialogue", DIALOGUE)
    page.route("**/v1/recognize", lambda route: route.abort("connectionrefused"))
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])")
    assert "Network error" in page.inner_text("#error")
    page.unroute("**/v1/recognize")
    submit(page)  # and the page recovers
    assert page.is_visible("#result") and not page.is_visible("#error")


def test_a_media_file_goes_with_its_turn_as_base64(page, server, tmp_path):
    from mer_ray.demo import media as sm

    wav = sm.write_media(tmp_path / "voice.wav", audio=sm.voice(1.0, seed=4))
    page.fill("#dialogue", DIALOGUE)
    page.click("#media summary")
    page.set_input_files("#audio-1", str(wav))
    sent = submit(page)
    assert sent["utterances"][1]["audio_b64"] == base64.b64encode(Path(wav).read_bytes()).decode()
    assert [k for k, u in enumerate(sent["utterances"]) if set(u) != {"speaker", "text"}] == [1]
    want = recognize(server, sent)
    assert want.status_code == 200, want.text
    check_shown_equals_answer(page, want.json(), TURNS)


def test_a_meld_like_dialogue_and_the_screenshot(page, server, tmp_path):
    page.click("#example")
    assert page.eval_on_selector_all("#media-list li", "ls => ls.length") == 8  # one media row per turn
    sent = submit(page)
    want = recognize(server, sent).json()
    check_shown_equals_answer(page, want, sent["utterances"])
    out = Path(os.environ.get("MER_PAGE_SCREENSHOT") or tmp_path / "page.png")
    page.screenshot(path=str(out), full_page=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
