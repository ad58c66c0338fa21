"""What `make demo` prints for a person: labels, top probabilities, and the prediction set when there is one."""

from mer_ray.serve.client import SAMPLE_DIALOGUE, format_answer


def _answer(calibrated: bool) -> dict:
    probs = {"neutral": 0.2, "joy": 0.7, "fear": 0.1}
    utt = {"label": "joy", "probs": probs, "probs_uncalibrated": probs, "llm": None, "receptive_fields": [],
           "prediction_set": ["joy", "neutral"] if calibrated else None}
    return {"label_set": "meld7", "labels": list(probs), "utterances": [utt] * 2, "timing_ms": {"total": 12.0},
            "calibrated": calibrated, "alpha": 0.1 if calibrated else None, "conformal": None}


def test_a_calibrated_answer_shows_each_set_and_the_alpha():
    text = format_answer("http://h:1/", SAMPLE_DIALOGUE[:2], _answer(True), use_llm=False)
    assert "prediction sets at alpha 0.1" in text
    assert text.count("set {joy, neutral}") == 2 and "joy 0.70 neutral 0.20" in text
    assert "page: http://h:1/" in text


def test_an_uncalibrated_answer_says_so_and_shows_no_set():
    text = format_answer("http://h:1", SAMPLE_DIALOGUE[:2], _answer(False), use_llm=True)
    assert "uncalibrated (no calibration.json)" in text and "set {" not in text
