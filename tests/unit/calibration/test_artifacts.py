"""``calibration.json``: round trip, a missing file, a corrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mer_ray.calibration.artifacts import CALIBRATION_FILE, Calibration
from mer_ray.calibration.calibrate import fit_calibration
from mer_ray.data.labels import get_label_set
from tests.unit.calibration.synth import dialogues, draw

MELD7 = list(get_label_set("meld7").labels)


def _cal() -> Calibration:
    z, y, _ = draw(1_000, seed=0)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return fit_calibration({"final_llm": p, "final_no_llm": p, "vanilla": p, "llm": p}, y, dialogues(1_000), MELD7,
                           fitted_on={"kind": "synthetic"})


def test_round_trip(tmp_path):
    cal = _cal()
    path = cal.save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE and not list(tmp_path.glob("*.tmp"))
    back = Calibration.load(tmp_path)
    assert back == cal
    assert back.label_set == "meld7" and back.method == "class_conditional_lac" and back.alpha_default == 0.1
    assert set(back.temperatures) == {"final_llm", "final_no_llm", "vanilla", "llm"}
    assert set(back.conformal) == {"final_llm", "final_no_llm"}  # only the served distributions get sets
    assert back.fitted_on["split"] == "dev" and back.fitted_on["kind"] == "synthetic"
    assert back.temperatures["final_llm"] == pytest.approx(2.0, rel=0.2)


def test_no_file_is_none(tmp_path):
    assert Calibration.load(tmp_path) is None


@pytest.mark.parametrize("text", ["{not json", json.dumps({"version": 1, "labels": ["a"]}),
                                  "__temps__"])
def test_a_corrupted_file_raises_naming_it(tmp_path, text):
    if text == "__temps__":  # valid JSON and keys, an impossible temperature
        d = json.loads(_cal().model_dump_json())
        d["temperatures"]["final_llm"] = -1.0
        text = json.dumps(d)
    (tmp_path / CALIBRATION_FILE).write_text(text)
    with pytest.raises(ValueError, match=str(tmp_path / CALIBRATION_FILE)):
        Calibration.load(tmp_path)
