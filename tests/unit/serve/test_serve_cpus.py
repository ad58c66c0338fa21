"""Shipped laptop Serve configs fit a 2-core machine, and one that does not fails at once with the numbers.

At 0.5 CPU per fine-tuned member, serve/ensemble.yaml asked 2.2 CPUs for the MELD run's graph; on a
2-core laptop Serve then waited forever for the last replica, and `mer serve` hung without an error.
"""

from __future__ import annotations

import json

import pytest

from mer_ray.serve.deploy import check_cpus, requested_cpus, resolve

#: The MELD run's fitted fusion lists these fine-tuned members (runs/ensemble_meld/report/fusion).
MELD_MEMBERS = ["farcer", "lantern_farcer"]


@pytest.fixture
def ensemble_run(tmp_path):
    fdir = tmp_path / "report" / "fusion"
    fdir.mkdir(parents=True)
    (fdir / "ensemble_fusion.json").write_text(json.dumps({"lantern": True, "members": MELD_MEMBERS}))
    return tmp_path


@pytest.mark.parametrize("yaml", ["serve/mer.yaml", "serve/bench.yaml", "serve/ensemble.yaml", "serve/ha.yaml", "serve/colocated.yaml",
                                  "serve/bench_colocated.yaml"])
def test_laptop_configs_fit_two_cores(yaml, ensemble_run, tmp_path):
    models = ensemble_run if yaml == "serve/ensemble.yaml" else tmp_path / "plain"
    cfg, options, _ = resolve(yaml, [("models_dir", str(models))])
    asked = requested_cpus(cfg, options)
    if yaml == "serve/ensemble.yaml":
        assert {f"FinetunedLLM_{m}" for m in MELD_MEMBERS} <= set(asked)  # one deployment per member
    assert sum(asked.values()) <= 2.0, asked
    check_cpus(cfg, options, 2.0)


def test_ha_keeps_two_replicas_of_everything_llm_path_included_within_two_cores(tmp_path):
    cfg, options, _ = resolve("serve/ha.yaml", [("models_dir", str(tmp_path))])
    asked = requested_cpus(cfg, options)
    assert {"LLMRefiner", "Fusion"} <= set(asked) and sum(asked.values()) <= 2.0, asked
    assert all(options[d]["num_replicas"] >= 2 for d in asked), options
    check_cpus(cfg, options, 2.0)


def test_a_config_over_the_local_cpus_is_an_error_naming_them(ensemble_run):
    cfg, options, _ = resolve("serve/ensemble.yaml", [("models_dir", str(ensemble_run))])
    options["FinetunedLLM"]["ray_actor_options"]["num_cpus"] = 0.5
    with pytest.raises(ValueError, match=r"asks for 2\.2 CPUs .*FinetunedLLM_lantern_farcer 0\.5.* local Ray has 2"):
        check_cpus(cfg, options, 2.0)
