"""What the evaluate stage hands to the register stage (and what is written to the store as JSON).

The pipeline (flows/distill.py) produces these; the registry (flows/registry/) consumes them.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from flows.storage.checksums import json_digest


class EvalProtocol(BaseModel):
    """How a number was measured; two numbers are comparable only under the same protocol hash."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metric: str = Field(description="fd_exact | rmse | fid")
    num_samples: int
    seed: int
    reference: str = Field(default="", description="what the samples are compared with (mixture hash, FID stats hash)")

    @property
    def hash(self) -> str:
        return json_digest(self.model_dump(), compact=False)


class CandidateResult(BaseModel):
    """One trained predictor, evaluated next to its base solver at the same NFE."""

    model_config = ConfigDict(extra="forbid")

    dataset: str
    solver: str                       # e.g. "amed", "amed+ipndm"
    base_solver: str                  # the training-free solver it is compared with at the same NFE
    nfe: int
    seed: int
    checkpoint_url: str               # folder holding predictor.safetensors + sampler.json
    protocol: EvalProtocol
    value: float                      # the protocol's metric (lower is better)
    base_value: float                 # the base solver's metric under the same protocol
    rmse: Optional[float] = None
    train_seconds: float = 0.0
    teacher_nfe: int = 0              # denoiser calls spent by the (shared) teacher, attributed to this sweep
    loss_history: list[float] = Field(default_factory=list)
    artifacts: dict[str, str] = Field(default_factory=dict)  # name -> URL (samples.png, schedule.png)
    sampler_spec: dict = Field(default_factory=dict)          # the SamplerSpec JSON
    # Families (issue 12): what the candidate is, what it costs, and the training-free panel it is compared with.
    family: str = "amed"              # free | gits | amed | epd
    denoiser_calls: Optional[int] = None   # per sample (EPD: (N - 1)(K + 1) - afs; the others: the NFE)
    teacher_id: str = ""              # the teacher's identity: model_id, else <dataset>-<content hash[:8]>
    panel_best: dict = Field(default_factory=dict)            # the best training-free entry: solver, options, value
    panel_value: Optional[float] = None                       # its metric (the baseline every candidate faces)
    per_sample: dict = Field(default_factory=dict)            # error vs the reference solution: median, p90, p99

    @property
    def margin(self) -> Optional[float]:
        """value / panel_value (< 1: better than the best training-free sampler)."""
        if self.panel_value is None or not self.panel_value:
            return None
        return self.value / self.panel_value

    @property
    def registered_name(self) -> str:
        """Registered model per (teacher identity, NFE): ``amed-<model_id or dataset-hash8>-nfe<N>``, so a new
        checkpoint of a model never inherits the old one's champion (results without a teacher id: the dataset)."""
        ident = self.teacher_id or self.dataset
        return f"amed-{ident}-nfe{self.nfe}".replace(":", "-").replace("/", "-").replace("+", "-")
