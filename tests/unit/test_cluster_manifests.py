"""Every deployment manifest in cluster/ and serve/ is checked against what exists.

Published schemas used: Ray's cluster-launcher schema (``ray/autoscaler/ray-schema.json``,
shipped in the ``ray`` wheel, through Ray's own ``prepare_config``/``validate_config``)
and Ray Serve's config schema (``ray.serve.schema.ServeDeploySchema``), for
``serve/*.yaml`` and the RayService's ``serveConfigV2``. The KubeRay CRD
schemas are published only in the KubeRay repository (no PyPI or npm package
ships them), so the KubeRay manifests get structural checks here: the keys the
CRDs require, replica bounds, images, and entry points and config paths that
exist in this repository.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE_REPO = "/home/ray/mer-ray"  # where cluster/Dockerfile and the launcher YAMLs put the repository
LAUNCHERS = ["cluster/aws.yaml", "cluster/gcp.yaml"]
SERVE_YAMLS = sorted(str(p.relative_to(REPO)) for p in (REPO / "serve").glob("*.yaml"))


def load(rel: str) -> dict:
    return yaml.safe_load((REPO / rel).read_text())


def makefile_no_deps() -> str:
    line = next(ln for ln in (REPO / "Makefile").read_text().splitlines() if "--no-deps" in ln)
    return line.split("--no-deps", 1)[1].strip()


def repo_path(p: str) -> Path:
    """A path inside the image (``/home/ray/mer-ray/...``) or repo-relative -> the repo file."""
    return REPO / (p[len(IMAGE_REPO) + 1:] if p.startswith(IMAGE_REPO + "/") else p)


def test_every_shipped_manifest_is_covered():
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "cluster").glob("*.yaml")}
    assert shipped == set(LAUNCHERS) | {"cluster/kuberay-raycluster.yaml", "cluster/kuberay-rayjob.yaml", "cluster/kuberay-rayservice.yaml"}
    assert {"serve/mer.yaml", "serve/bench.yaml", "serve/cluster.yaml"} <= set(SERVE_YAMLS)


def test_install_step_matches_the_makefile():
    install = (REPO / "cluster/install.sh").read_text()
    assert f"--no-deps {makefile_no_deps()}" in install
    assert "pip install -e ." in install and "mer_ray.assets prepare" in install
    docker = (REPO / "cluster/Dockerfile").read_text()
    import ray

    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray.__version__)}-py311", docker, re.M), "image Ray must match the installed Ray"
    assert "cluster/install.sh" in docker


@pytest.mark.parametrize("rel", LAUNCHERS)
def test_cluster_launcher_yaml_validates_against_rays_schema(rel):
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(rel)
    cfg = prepare_config(yaml.safe_load((REPO / rel).read_text()))
    validate_config(cfg)  # jsonschema against ray/autoscaler/ray-schema.json, plus Ray's own checks
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    machine = head["node_config"].get("InstanceType") or head["node_config"].get("machineType")
    assert "GPU" not in head["resources"] and not re.match(r"^(g\d|p\d|a2|a3)", machine), f"head must be a CPU node: {machine}"
    gpu_groups = [n for n in types if n != raw["head_node_type"]]
    assert gpu_groups, "needs GPU worker groups"
    for name in gpu_groups:
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"], name
        assert t["max_workers"] > 0
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}")
    assert raw["file_mounts"] == {IMAGE_REPO: "."}
    cmds = " ".join(raw["setup_commands"])
    assert f"bash {IMAGE_REPO}/cluster/install.sh" in cmds and (REPO / "cluster/install.sh").exists()
    if raw["provider"]["type"] == "gcp":  # GCP does not report GPUs: each GPU group must declare them
        assert all(types[n]["resources"].get("GPU", 0) >= 1 for n in gpu_groups)


def _pod_specs(cluster_spec: dict) -> list[dict]:
    specs = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    specs += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    return specs


def check_ray_cluster_spec(spec: dict, gpu_group_required: bool = True) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
    groups = spec["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    if gpu_group_required:
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for g in groups for c in g["template"]["spec"]["containers"])
    docker = (REPO / "cluster/Dockerfile").read_text()
    for pod in _pod_specs(spec):
        names = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["name"] and c["image"].startswith("ghcr.io/YOUR_ORG/mer-ray:"), c["image"]
            assert c["image"].split(":")[0].split("/")[-1] in docker  # the image the Dockerfile builds
            for m in c.get("volumeMounts", []):
                assert m["name"] in names, f"volumeMount {m['name']} has no volume"
            lim, req = c["resources"]["limits"], c["resources"]["requests"]
            assert set(req) <= set(lim)


def test_kuberay_raycluster():
    m = load("cluster/kuberay-raycluster.yaml")
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayCluster") and m["metadata"]["name"]
    assert m["spec"]["enableInTreeAutoscaling"] is True
    check_ray_cluster_spec(m["spec"])


def test_kuberay_rayjob_runs_the_finetuning_entry_point_with_a_shipped_config():
    m = load("cluster/kuberay-rayjob.yaml")
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayJob") and m["metadata"]["name"]
    spec = m["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and repo_path(argv[1]) == REPO / "jobs/finetune.py" and (REPO / "jobs/finetune.py").exists()
    config = repo_path(argv[argv.index("--config") + 1])
    assert config.exists() and config.parent == REPO / "jobs", config
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("finetune_job", REPO / "jobs/finetune.py")
    job = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(job)
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    from mer_ray.config import load as load_config

    loaded = load_config(job.CONFIG, config, sets)
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]

    def total(key: str) -> float:
        return sum(float(c["resources"]["limits"].get(key, 0)) * g["maxReplicas"] for g in groups for c in g["template"]["spec"]["containers"])

    r = loaded.ray  # the job's Ray Train workers must fit the job's cluster
    assert r.num_workers * (1 if r.use_gpu else 0) <= total("nvidia.com/gpu")
    assert r.num_workers * r.cpus_per_worker <= total("cpu")
    assert loaded.out and loaded.out.startswith("/models")  # the adapter lands where RayService reads mllm/


def _validate_serve(raw: dict) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)


@pytest.mark.parametrize("rel", SERVE_YAMLS)
def test_serve_yaml_validates_and_builds_against_the_app(rel):
    from mer_ray.config import load as load_config
    from mer_ray.serve.builder import DEPLOYMENTS, app_builder, read_serve_yaml
    from mer_ray.serve.config import ServeConfig

    raw, app, options = read_serve_yaml(REPO / rel)
    _validate_serve(raw)
    assert app["import_path"] == "mer_ray.serve.builder:app_builder" and callable(app_builder)
    cfg = load_config(ServeConfig, app["args"])  # unknown keys are errors
    assert set(options) <= set(DEPLOYMENTS)
    if "EnsembleFusion" in options:  # an `mer ensemble` run: its fusion, and one options block for every fine-tuned LLM
        expected = {"Ingress", "Featurizer", "Vanilla", "EnsembleFusion"} | ({"LLMRefiner", "FinetunedLLM"} if cfg.llm.enabled else set())
    else:
        text = {"FeaturizerVanilla"} if cfg.layout == "colocated" else {"Featurizer", "Vanilla"}
        expected = {"Ingress", *text} | ({"LLMRefiner", "Fusion"} if cfg.llm.enabled else set()) | ({"MLLM"} if cfg.use_mllm else set())
    expected |= {"Adapters"} if cfg.adapters.enabled else set()
    assert set(options) == expected, f"{rel}: every deployed member needs its own resources and scaling"
    for name, o in options.items():
        assert "ray_actor_options" in o and ("autoscaling_config" in o or "num_replicas" in o), name
        a = o.get("autoscaling_config")
        if a:
            assert 1 <= a["min_replicas"] <= a["max_replicas"]
    if rel in ("serve/bench.yaml", "serve/bench_colocated.yaml"):  # a benchmark runs with fixed replicas
        assert all("autoscaling_config" not in o and isinstance(o["num_replicas"], int) for o in options.values())
    assert (REPO / rel).read_text().startswith("#")  # the header says how to run it


def test_kuberay_rayservice_embeds_the_cluster_serve_config():
    m = load("cluster/kuberay-rayservice.yaml")
    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayService") and m["metadata"]["name"]
    check_ray_cluster_spec(m["spec"]["rayClusterConfig"])
    embedded = yaml.safe_load(m["spec"]["serveConfigV2"])
    _validate_serve(embedded)
    assert embedded["applications"] == load("serve/cluster.yaml")["applications"]
    args = embedded["applications"][0]["args"]
    for key_env in (args.get("api_key_env"), (args.get("sessions") or {}).get("redis_password_env")):
        if key_env:  # every pod must get the secrets the app reads
            for pod in _pod_specs(m["spec"]["rayClusterConfig"]):
                assert all(any(e["name"] == key_env for e in c.get("env", [])) for c in pod["containers"]), key_env
    mounts = {mt["mountPath"] for pod in _pod_specs(m["spec"]["rayClusterConfig"]) for c in pod["containers"] for mt in c.get("volumeMounts", [])}
    assert embedded["applications"][0]["args"]["models_dir"] in mounts
    if (args.get("adapters") or {}).get("enabled"):  # adapters on shared storage: any pod may host a replica
        for pod in _pod_specs(m["spec"]["rayClusterConfig"]):
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            at = [claims.get(mt["name"]) for c in pod["containers"] for mt in c.get("volumeMounts", []) if mt["mountPath"] == args["models_dir"]]
            assert at == ["mer-models"] * len(pod["containers"]), "every pod mounts the one models PVC at models_dir"


def test_manifests_name_no_repo_file_that_does_not_exist():
    text = "\n".join((REPO / p).read_text() for p in LAUNCHERS + ["cluster/kuberay-raycluster.yaml", "cluster/kuberay-rayjob.yaml",
                                                                  "cluster/kuberay-rayservice.yaml", "cluster/Dockerfile"])
    for ref in set(re.findall(r"(?:^|[\s=/])((?:jobs|serve|cluster)/[\w.-]+\.(?:py|yaml|sh))", text)):
        assert (REPO / ref).exists(), ref
    assert json.loads(json.dumps(load("cluster/kuberay-rayjob.yaml")))  # plain data, no YAML tags


def test_kuberay_rayservice_is_highly_available():
    """GCS fault tolerance through an external Redis, and every deployment spread over nodes with at least two
    replicas (so losing the head, or any one node, leaves each stage served)."""
    m = load("cluster/kuberay-rayservice.yaml")
    rc = m["spec"]["rayClusterConfig"]
    ft = rc["gcsFaultToleranceOptions"]
    host, _, port = ft["redisAddress"].rpartition(":")
    assert host and port.isdigit()
    ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert ref["name"] in (REPO / "cluster/kuberay-rayservice.yaml").read_text().split("spec:")[0]  # the header says how to make it
    # KubeRay rejects a Redis address given both here and as RAY_REDIS_ADDRESS / redis-password in rayStartParams
    pods = _pod_specs(rc)
    assert not any(e["name"] == "RAY_REDIS_ADDRESS" for pod in pods for c in pod["containers"] for e in c.get("env", []))
    assert "redis-password" not in rc["headGroupSpec"]["rayStartParams"]
    assert rc["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"  # no replica shares the head's fate
    apps = yaml.safe_load(m["spec"]["serveConfigV2"])["applications"]
    deployments = [d for app in apps for d in app["deployments"]]
    assert deployments
    gpu_nodes = sum(g["minReplicas"] for g in rc["workerGroupSpecs"]
                    if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"]))
    all_nodes = sum(g["minReplicas"] for g in rc["workerGroupSpecs"])
    for d in deployments:
        floor = d["autoscaling_config"]["min_replicas"] if "autoscaling_config" in d else d["num_replicas"]
        assert floor >= 2, d["name"]
        assert d["max_replicas_per_node"] == 1, d["name"]
        # the floor fits on the minimum cluster, one replica per node (GPU stages on GPU nodes)
        nodes = gpu_nodes if d.get("ray_actor_options", {}).get("num_gpus") else all_nodes
        assert floor <= nodes, (d["name"], floor, nodes)
