"""``mer bench serve`` without Ray or models: the payload rule and the summary's keys, from made-up sweep rows."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mer_ray.bench.serve_load import PayloadError, payloads
from mer_ray.bench.serve_report import summarize


def test_no_data_dir_without_payloads_generated_fails_naming_both(monkeypatch, tmp_path):
    monkeypatch.delenv("MER_MELD_DIR", raising=False)
    with pytest.raises(PayloadError, match="--data-dir") as e:
        payloads(None)
    assert "--payloads generated" in str(e.value)
    with pytest.raises(PayloadError, match="dev_sent_emo.csv"):
        payloads(tmp_path)  # a directory without MELD's dev split
    dialogues, source = payloads(None, "generated")
    assert source == "generated" and dialogues and all(d and len(d) <= 24 for d in dialogues)


def test_the_command_exits_2_before_starting_anything(monkeypatch, tmp_path):
    from mer_ray.bench.cli import app

    monkeypatch.delenv("MER_MELD_DIR", raising=False)
    r = CliRunner().invoke(app, ["serve", "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 2
    assert "--data-dir" in r.output and "--payloads generated" in r.output
    assert not (tmp_path / "b.json").exists()


def _row(mode, c, rps, p50=100.0, p99=200.0, **setting):
    return {"mode": mode, "concurrency": c, "use_llm": False, "rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": 100,
            "errors": 0, **setting}


def test_summary_takes_each_sides_fastest_setting():
    serve = [_row("serve", c, rps, p50, layout="a.yaml", torch_threads=t,
                  batch={"Featurizer": {"calls": 10, "items": 10 * c, "max": c, "mean": float(c)}, "Ingress": None},
                  cpu_s={"Featurizer": 5.0, "proxy": 1.0, "load_generator": 2.0})
             for t, scale in ((1, 1.0), (2, 0.5)) for c, rps, p50 in ((1, 10 * scale, 80.0), (16, 30 * scale, 500.0))]
    uvi = [_row("uvicorn", c, rps, p50, torch_threads=1, pool=pool, cpu_s={"uvicorn": 6.0})
           for pool, scale in ((4, 1.0), (16, 0.9)) for c, rps, p50 in ((1, 12 * scale, 70.0), (16, 20 * scale, 700.0))]
    inp = [_row("inprocess", c, rps, torch_threads=1) for c, rps in ((1, 15.0), (16, 25.0))]
    bat = [_row("inprocess_batched", 16, 40.0, torch_threads=1)]
    report = {"results": serve + uvi + inp + bat, "machine": {"cores": 2}, "stage_cpu_ms": {"featurize": 40.0, "vanilla": 1.0}}
    s = summarize(report, [1, 16])
    assert s["serve_over_uvicorn"] == 1.5 and s["serve_over_inprocess"] == 1.2 and s["serve_over_inprocess_batched"] == 0.75
    assert s["p99_over_p50"] == 0.4 and s["c1_p50_over_uvicorn"] == round(80 / 70, 3) and s["errors"] == 0
    assert s["fastest"]["serve"]["torch_threads"] == 1 and s["fastest"]["uvicorn"]["pool"] == 4
    assert s["mean_batch_size"] == {"Featurizer": {"1": 1.0, "16": 16.0}, "Ingress": {"1": None, "16": None}}
    pm = s["paper_model"]
    assert pm["serve_cpu_ms_total"] == 60.0 and pm["uvicorn_cpu_ms_per_request"] == 60.0  # the load generator left out
    assert pm["rps"]["4"]["serve"] == round(4 * 2 * 1e3 / 60, 1) and pm["serve_overhead_cpu_ms"] == 19.0
    assert s["by_layout"]["a.yaml"]["serve_over_uvicorn"] == 1.5
    assert s["goals"]["serve_over_uvicorn_at_least_1.0"] and s["goals"]["c1_p50_over_uvicorn_at_most_1.3"]
