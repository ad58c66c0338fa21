"""Build the Serve application from a :class:`ServeConfig` (and ``serve/*.yaml``).

``app_builder`` is the ``import_path`` of every shipped Serve config, so
``serve run serve/mer.yaml`` and a KubeRay ``RayService`` build the same graph
as ``mer serve``; ``mer serve`` reads the same YAML and applies its per-deployment
options itself (no dashboard needed).
"""

from __future__ import annotations

from pathlib import Path

from mer_ray.config import load
from mer_ray.serve.config import ServeConfig

#: ``FinetunedLLM`` options apply to every fine-tuned member of an ``mer ensemble`` run (``FinetunedLLM_<member>``).
DEPLOYMENTS = ("Ingress", "Featurizer", "Vanilla", "FeaturizerVanilla", "LLMRefiner", "Fusion", "MLLM", "FinetunedLLM",
               "EnsembleFusion", "Adapters")
#: The text-model deployments each layout deploys (``ServeConfig.layout``).
LAYOUT_DEPLOYMENTS = {"split": ("Featurizer", "Vanilla"), "colocated": ("FeaturizerVanilla",)}
_OPTION_KEYS = {"num_replicas", "autoscaling_config", "ray_actor_options", "max_ongoing_requests", "max_queued_requests",
                "graceful_shutdown_timeout_s", "graceful_shutdown_wait_loop_s", "health_check_period_s",
                "health_check_timeout_s", "user_config", "max_replicas_per_node"}


def check_models(cfg: ServeConfig) -> list[str]:
    """What the config needs from the models dir and is missing (empty: all there)."""
    from mer_ray.lantern.artifacts import META_FILE as FUSION_META
    from mer_ray.mllm.artifacts import META_FILE as MLLM_META
    from mer_ray.serve.ensemble_run import check_run, is_ensemble_run
    from mer_ray.vanilla.artifacts import META_FILE as VANILLA_META

    root = cfg.models_path
    if is_ensemble_run(root):
        return check_run(root, cfg.llm.enabled)
    need = [("vanilla", VANILLA_META)]
    if cfg.llm.enabled:
        need.append(("fusion", FUSION_META))
    if cfg.use_mllm:
        need.append(("mllm", MLLM_META))
    return [f"{root / d}/{f}" for d, f in need if not (root / d / f).exists()]


class MissingModelsError(FileNotFoundError):
    """The models directory lacks files the config needs; the message names them and the commands that make them."""


#: What makes each model directory.
MAKERS = {
    "vanilla": "mer pipeline --dataset meld --data-dir DIR --out RUN (a real MELD model: RUN/models/vanilla/seed0), "
               "or mer demo (a generated-corpus plumbing check)",
    "fusion": "mer lantern fuse ... --out RUN (writes RUN/fusion/), or mer demo; or serve with --no-llm",
    "mllm": "mer finetune --config jobs/finetune_cpu.yaml (copy its out/ to <models>/mllm), or use_mllm: false",
}
#: What makes (or resumes) an ``mer ensemble`` run directory.
ENSEMBLE_MAKER = ("mer ensemble --config jobs/ensemble_meld.yaml --set data_dir=DIR --set out=RUN (resumes what is "
                  "missing: RUN/vanilla/models/vanilla/seed*, RUN/lantern/job.json, RUN/farcer, RUN/lantern_farcer, "
                  "RUN/report/fusion); or serve with --no-llm for the vanilla seed average")


def require_adapters(cfg: ServeConfig) -> None:
    """With ``adapters.enabled``, raise :class:`MissingModelsError` unless ``<models>/mllm/adapters/`` holds an adapter.

    An endpoint whose every adapter request is a 422 is a mistake to report when it is deployed, not per request.
    """
    from mer_ray.mllm.adapters import adapters_root, list_adapters

    if cfg.adapters.enabled and not list_adapters(cfg.models_path):
        raise MissingModelsError(f"adapters.enabled is true but {adapters_root(cfg.models_path)} holds no adapter (a folder "
                                 f"<name>/ with mer_mllm.json). Make one with: mer finetune --config jobs/finetune_cpu.yaml "
                                 f"--adapter-name NAME --models {cfg.models_dir}; or set adapters.enabled: false")


def require_models(cfg: ServeConfig) -> None:
    """Raise :class:`MissingModelsError` unless every model the config serves is in ``cfg.models_dir``.

    Nothing is trained here: a server that trained a stand-in model behind its user's back would
    answer real dialogues with near-uniform probabilities and never say so. A ``calibration.json`` is
    optional (without it the service answers ``calibrated: false``), but one that does not load is an error.

    Raises:
        MissingModelsError: a model is missing.
        ValueError: ``calibration.json`` is not a valid calibration (the message names it).
    """
    from mer_ray.serve.ensemble_run import is_ensemble_run

    missing = check_models(cfg)
    if missing and is_ensemble_run(cfg.models_path):
        raise MissingModelsError(f"models dir {cfg.models_dir!r} is an `mer ensemble` run lacking {missing}. "
                                 f"Make them with: {ENSEMBLE_MAKER}.")
    if is_ensemble_run(cfg.models_path) and cfg.use_mllm:
        raise ValueError(f"{cfg.models_dir}: an `mer ensemble` run serves its own fine-tuned members (its fusion "
                         "config lists them); set use_mllm: false")
    if missing:
        how = "; ".join(f"{d}/: {MAKERS[d]}" for d in MAKERS if any(f"/{d}/" in m for m in missing))
        raise MissingModelsError(f"models dir {cfg.models_dir!r} lacks {missing}. Make them with: {how}. "
                                 "Then pass --models DIR.")
    from mer_ray.calibration.artifacts import Calibration

    Calibration.load(cfg.models_path)  # a bad calibration.json fails here, naming it, not in every Ingress replica
    require_adapters(cfg)


def build_app(cfg: ServeConfig | dict | None = None, options: dict[str, dict] | None = None):
    """The bound application: Ingress -> Featurizer, Vanilla (or FeaturizerVanilla), [LLMRefiner, Fusion], [MLLM], [Adapters].

    An ``mer ensemble`` run directory gets its own graph (:func:`_ensemble_app`); either may add the adapters.

    Args:
        cfg: the app config (models dir is made absolute here, so replicas find it from any cwd).
        options: per-deployment ``.options()`` (``num_replicas``, ``autoscaling_config``, ...), by name.

    Raises:
        MissingModelsError: ``adapters.enabled`` and no adapter installed (:func:`require_adapters`).
    """
    from mer_ray.serve.deployments import MLLM, Featurizer, FeaturizerVanilla, Fusion, LLMRefiner, Vanilla
    from mer_ray.serve.ingress import Ingress

    cfg = load(ServeConfig, cfg)
    cfg = cfg.model_copy(update={"models_dir": str(cfg.models_path.resolve())})
    options = options or {}
    check_options(cfg, options)
    require_adapters(cfg)  # before anything is bound, so this error is the one a user sees

    def opt(d):
        return d.options(**options[d.name]) if options.get(d.name) else d

    th, md = cfg.torch_threads, cfg.models_dir
    if cfg.layout == "colocated":  # one deployment answers both handles (the Ingress calls featurize_predict)
        feat = van = opt(FeaturizerVanilla).bind(md, th)
    else:
        feat, van = opt(Featurizer).bind(th), opt(Vanilla).bind(md, th)
    from mer_ray.serve.ensemble_run import is_ensemble_run

    adapters = _adapters(cfg, opt)
    if is_ensemble_run(md):
        return _ensemble_app(cfg, opt, options, feat, van, adapters)
    ref = fus = mllm = None
    if cfg.llm.enabled:
        ref = opt(LLMRefiner).bind(md, cfg.llm.model_dump(), cfg.llm.n_threads)
        fus = opt(Fusion).bind(md, th)
    if cfg.use_mllm:
        mllm = opt(MLLM).bind(md, th)
    return opt(Ingress).bind(cfg.model_dump(), feat, van, ref, fus, mllm, None, None, adapters)


def _adapters(cfg: ServeConfig, opt):
    """The bound ``Adapters`` deployment (its LRU bound from ``adapters.max_num_models_per_replica``), or None."""
    if not cfg.adapters.enabled:
        return None
    from mer_ray.serve.multiplexed import adapters_deployment

    a = cfg.adapters
    return opt(adapters_deployment(a.max_num_models_per_replica)).bind(cfg.models_dir, a.threads or cfg.torch_threads, a.batch_size)


def check_options(cfg: ServeConfig, options: dict[str, dict]) -> None:
    """Refuse options for an unknown deployment, for a text deployment the layout does not deploy, and a
    ``user_config`` that is not a batched deployment's :class:`~mer_ray.serve.deployments.BatchSettings`.

    Raises:
        ValueError: the message names the deployment and the problem.
    """
    from mer_ray.serve.deployments import BATCHED, BatchSettings

    bad = sorted(n for n in set(options) - set(DEPLOYMENTS) if not n.startswith("FinetunedLLM_"))
    if bad:
        raise ValueError(f"unknown deployment names {bad}; known: {list(DEPLOYMENTS)}")
    other = [n for lay, names in LAYOUT_DEPLOYMENTS.items() if lay != cfg.layout for n in names if n in options]
    if other:
        raise ValueError(f"options for {other}, which layout {cfg.layout!r} does not deploy (it deploys "
                         f"{list(LAYOUT_DEPLOYMENTS[cfg.layout])}); set args.layout or rename the entries")
    for name, o in options.items():
        if "user_config" not in o:
            continue
        if name not in BATCHED:
            raise ValueError(f"deployment {name!r}: user_config is only read by the batched deployments {list(BATCHED)}")
        try:
            BatchSettings.model_validate(o["user_config"])
        except Exception as e:
            raise ValueError(f"deployment {name!r}: bad user_config: {e}") from None


def _ensemble_app(cfg: ServeConfig, opt, options: dict[str, dict], feat, van, adapters=None):
    """An ``mer ensemble`` run: Ingress -> Featurizer, Vanilla (seed mean), [LLMRefiner, FinetunedLLM_<m>..., EnsembleFusion].

    The LLM deployments are bound only when the fitted fusion reads them (a fusion that selected the vanilla
    average needs none); each fine-tuned member is its own deployment, scaled and placed on its own.
    """
    from mer_ray.serve.deployments import EnsembleFusion, FinetunedLLM, LLMRefiner
    from mer_ray.serve.ensemble_run import fusion_config, uses_llm
    from mer_ray.serve.ingress import Ingress

    th, md = cfg.torch_threads, cfg.models_dir
    fcfg = fusion_config(md)
    ref = members = fus = None
    if cfg.llm.enabled and uses_llm(fcfg):
        if fcfg.get("lantern"):
            ref = opt(LLMRefiner).bind(md, cfg.llm.model_dump(), cfg.llm.n_threads)
        members = {m: opt(FinetunedLLM).options(name=f"FinetunedLLM_{m}", **options.get(f"FinetunedLLM_{m}", {})).bind(md, m, th)
                   for m in fcfg.get("members") or []}
        fus = opt(EnsembleFusion).bind(md, th)
    return opt(Ingress).bind(cfg.model_dump(), feat, van, ref, None, None, members, fus, adapters)


def app_builder(args: dict):
    """Entry point for ``import_path: mer_ray.serve.builder:app_builder``; ``args`` are ServeConfig fields."""
    return build_app(load(ServeConfig, dict(args or {})))


def read_serve_yaml(path: str | Path) -> tuple[dict, dict, dict[str, dict]]:
    """Validate a Serve config file with Ray's own schema; returns (top level, the app, options by deployment)."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load(Path(path).read_text())
    ServeDeploySchema.model_validate(raw) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(raw)
    apps = raw.get("applications") or []
    if len(apps) != 1:
        raise ValueError(f"{path}: expected exactly one application, found {len(apps)}")
    app = apps[0]
    options = {}
    for d in app.get("deployments") or []:
        extra = set(d) - _OPTION_KEYS - {"name"}
        if extra:
            raise ValueError(f"{path}: deployment {d.get('name')!r} has options mer serve does not apply: {sorted(extra)}")
        options[d["name"]] = {k: v for k, v in d.items() if k != "name"}
    return raw, app, options
