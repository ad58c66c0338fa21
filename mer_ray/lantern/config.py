"""Typed configs of the Lantern jobs (YAML in ``jobs/lantern_*.yaml``), validated on load."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from mer_ray.config import StrictModel
from mer_ray.lantern.http_backend import HttpBackendConfig
from mer_ray.lantern.queries import parse_sizes
from mer_ray.llm.backends import BackendConfig
from mer_ray.llm.prompts import DEFAULT_TEMPLATE

#: An engine config, or the string ``ray_data_http``. Tagged, so that a typo in an engine config is reported
#: against the engine's keys alone (``backend.engine.n_tread: unknown key``), not also as "not 'ray_data_http'".
_Backend = Annotated[Annotated[BackendConfig, Tag("engine")] | Annotated[Literal["ray_data_http"], Tag("ray_data_http")],
                     Discriminator(lambda v: "ray_data_http" if v == "ray_data_http" else "engine")]


class PromptJobConfig(StrictModel):
    """``mer lantern prompt``: which queries, which LLM, how many engines."""

    vanilla: str | None = Field(None, description="vanilla prediction Parquet (mer predict vanilla)")
    out: str | None = Field(None, description="output directory (parts/, queries.parquet, summary.json)")
    splits: list[str] = Field(["dev", "test"], description="splits of the vanilla file to prompt for")
    sizes: list[int | None] = Field([4, 8, None], description="receptive-field sizes; null = whole dialogue")
    stride: int = Field(1, ge=1, description="window stride")
    max_dialogues: int | None = Field(None, ge=1, description="first N dialogues per split (reduced runs)")
    template: str = Field(DEFAULT_TEMPLATE, description="prompt template name or .j2 path")
    few_shot: int = Field(0, ge=0, description="k labelled examples from train (needs data_dir)")
    data_dir: str | None = Field(None, description="MELD directory, for few-shot examples from train")
    backend: _Backend = Field(
        default_factory=BackendConfig, description="the LLM in an actor pool, or 'ray_data_http' (see http)")
    http: HttpBackendConfig | None = Field(None, description="backend ray_data_http: the server and the processor")
    actors: int = Field(1, ge=1, description="LLM engines in the actor pool")
    cpus_per_actor: float = Field(1.0, gt=0, description="Ray CPUs reserved per engine")
    ray_cpus: int = Field(2, ge=1, description="CPUs of the local Ray instance started if none is running")
    seed: int = 0

    @field_validator("sizes", mode="before")
    @classmethod
    def _sizes(cls, v):
        return parse_sizes(v)

    @model_validator(mode="after")
    def _http(self):
        if self.backend == "ray_data_http" and self.http is None:
            self.http = HttpBackendConfig()
        if self.backend != "ray_data_http" and self.http is not None:
            raise ValueError("http: settings are for backend: ray_data_http only")
        return self


class FuseConfig(StrictModel):
    """``mer lantern fuse``: cross-fitting on dev and the report on test."""

    vanilla: str | None = Field(None, description="vanilla predictions covering dev and test")
    llm: list[str] = Field(default_factory=list, description="prompt-job output directories")
    data_dir: str | None = Field(None, description="MELD directory (gold labels for fitting and scoring)")
    out: str | None = Field(None, description="report directory; the fusion artifacts go to <out>/fusion/")
    folds: int = Field(5, ge=2, description="k of k-fold cross-fitting on dev")
    stride: int | None = Field(None, ge=1, description="the prompt job's stride (size ablation); "
                                                     "default: read from the first --llm dir's job.json")
    seed: int = 0
