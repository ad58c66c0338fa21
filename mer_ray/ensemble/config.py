"""``mer ensemble``'s config (``jobs/ensemble_meld.yaml``): which recipes build each member, and the fusion."""

from __future__ import annotations

from pydantic import Field

from mer_ray.config import StrictModel


class ReferencesSettings(StrictModel):
    """Cross-fitted vanilla references on train, for Lantern x FARCER (:mod:`mer_ray.ensemble.references`)."""

    k: int = Field(5, ge=2, description="Folds of train dialogues.")
    seed: int = Field(0, description="Seed of the folds and of the fold models.")
    parallel: int = Field(2, ge=1, description="Fold models trained at once (1 CPU each).")
    recipe: str = Field("jobs/vanilla_meld_frozen.yaml", description="Pipeline YAML whose `train` section trains the fold models "
                                                                     "(frozen features: about a minute each).")


class EnsembleConfig(StrictModel):
    """Every stage of the MELD ensemble; each one skips what an earlier run finished."""

    data_dir: str | None = Field(None, description="MELD directory (default: $MER_MELD_DIR).")
    out: str = Field("runs/ensemble_meld", description="Run directory: one subdirectory per stage.")
    evidence: str | None = Field(None, description="Also copy the report, the prediction tables and the plot here (docs/bench/ensemble).")
    vanilla: str = Field("jobs/vanilla_meld.yaml", description="The vanilla recipe (mer pipeline); all its seeds are members.")
    lantern: str | None = Field("jobs/lantern_prompt.yaml", description="Lantern prompt job config; null: no Lantern member.")
    lantern_reference_seed: int = Field(0, description="Vanilla seed whose predictions Lantern's prompts carry as references.")
    farcer: str | None = Field("jobs/finetune_farcer_meld.yaml", description="FARCER fine-tuning config; null: no FARCER member.")
    lantern_farcer: str | None = Field("jobs/finetune_lantern_farcer_meld.yaml", description="Lantern x FARCER fine-tuning config; null: none.")
    references: ReferencesSettings = Field(default_factory=ReferencesSettings)
    splits: list[str] = Field(["dev", "test"], description="Splits every member predicts (dev fits the fusion, test reports).")
    predict_batch_size: int = Field(4, ge=1, description="Segments per forward pass when the fine-tuned LLMs predict.")
    fusion_folds: int = Field(5, ge=2, description="k of the fusion's cross-fitting on dev.")
    seed: int = Field(0, description="Seed of the fusion folds and of the bootstrap.")
    bootstrap: int = Field(1000, ge=100, description="Paired bootstrap resamples over test dialogues.")
    ray_cpus: int = Field(3, ge=1, description="CPUs of the local Ray instance started when none is given.")
