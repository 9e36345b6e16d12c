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

    @property
    def registered_name(self) -> str:
        """Registered model per (dataset, NFE)."""
        return f"amed-{self.dataset}-nfe{self.nfe}".replace(":", "-").replace("/", "-")
