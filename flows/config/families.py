"""The candidate families beyond AMED and the training-free panel (sections ``panel`` and ``families`` of a sweep)."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator

from amed_core.methods import get_method, method_names
from flows.config.base import StrictModel

__all__ = ["PanelEntry", "PanelConfig", "GITSFamilyConfig", "EPDFamilyConfig", "FamiliesConfig"]


class PanelEntry(StrictModel):
    """One training-free sampler of the panel: a solver with a schedule, AFS and options (unreachable NFEs skipped)."""

    solver: str
    schedule_type: Optional[Literal["polynomial", "logsnr", "time_uniform", "discrete"]] = Field(
        default=None, description="default: the solver's own (the method table's)")
    schedule_rho: Optional[float] = Field(default=None, gt=0)
    afs: Union[bool, Literal["auto"]] = Field(default=False, description="auto: on where the NFE needs it")
    options: dict[str, Any] = Field(default_factory=dict, description="solver options (over the table's defaults)")

    @field_validator("solver")
    @classmethod
    def _free(cls, v: str) -> str:
        if v not in method_names("free"):
            raise ValueError(f"panel solvers are training-free solvers {list(method_names('free'))}, got {v!r}")
        return v


def _default_panel() -> list[PanelEntry]:
    return [PanelEntry(solver="ipndm"), PanelEntry(solver="ipndm", afs=True), PanelEntry(solver="dpmpp"),
            PanelEntry(solver="deis"), PanelEntry(solver="heun", afs="auto")]


class PanelConfig(StrictModel):
    """The training-free panel evaluated at every (dataset, NFE): its best entry is the baseline of every candidate."""

    entries: list[PanelEntry] = Field(default_factory=_default_panel)
    include_base_solvers: bool = Field(default=True, description="each candidate's base solver is evaluated and joins "
                                       "the panel (false: neither; every candidate is compared with the panel alone)")
    expand: list[str] = Field(default_factory=list, description="solvers whose every option set joins the panel: AFS "
                              "on/off, polynomial 7 / logsnr / time_uniform, dynamic thresholding on/off (dpmpp, unipc)")

    @field_validator("expand")
    @classmethod
    def _expand(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s not in method_names("free")]
        if bad:
            raise ValueError(f"panel.expand: {bad} are not training-free solvers {list(method_names('free'))}")
        return v


class GITSFamilyConfig(StrictModel):
    """GITS candidates (a base solver on a schedule chosen by DP from a fine stored teacher grid)."""

    solvers: list[str] = Field(default_factory=list, description="base solvers, e.g. [ipndm] -> gits+ipndm")
    metric: Literal["dev", "l1", "l2"] = "dev"
    coeff: float = Field(default=1.15, gt=0)
    warmup: int = Field(default=256, ge=1, description="teacher trajectories the cost matrix is built from")
    grid_points: int = Field(default=41, ge=3, le=1001, description="points of the fine teacher grid GITS selects from")
    schedule_type: Literal["polynomial", "logsnr", "time_uniform"] = "polynomial"
    schedule_rho: float = Field(default=7.0, gt=0)
    sub_steps: int = Field(default=1, ge=1, le=16, description="teacher sub-steps between two fine-grid points")
    options: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per base solver options")

    @field_validator("solvers")
    @classmethod
    def _bases(cls, v: list[str]) -> list[str]:
        ok = [get_method(m).base for m in method_names("gits")]
        bad = [s for s in v if s not in ok]
        if bad or len(set(v)) != len(v):
            raise ValueError(f"gits solvers must be distinct base solvers among {ok}, got {v}")
        return v


class EPDFamilyConfig(StrictModel):
    """EPD candidates (K parallel directions per step, trained on the stored teacher at the student grid)."""

    solvers: list[Literal["epd", "epd+ipndm"]] = Field(default_factory=list)
    num_points: int = Field(default=2, ge=1, le=8)
    scale_dir: float = Field(default=0.01, ge=0)
    scale_time: float = Field(default=0.0, ge=0)
    afs: Union[bool, Literal["auto"]] = "auto"
    max_order: int = Field(default=4, ge=1, le=4)
    schedule_type: Literal["polynomial", "logsnr", "time_uniform"] = "polynomial"
    schedule_rho: float = Field(default=7.0, gt=0)
    # Our recipe (bench/families.py on digits-gmm): from the reference's random init, lr 5e-3 and one pass leave
    # the tables far from trained (FD 670 at NFE 5); lr 5e-2, 8 passes, relative weighting reach FD 0.16.
    lr: float = Field(default=5e-2, gt=0, description="Adam lr (the reference: 5e-3)")
    batch_size: int = Field(default=128, ge=1)
    epochs: int = Field(default=8, ge=1, description="passes over the stored teacher (the reference: 1)")
    loss_weighting: Literal["sum", "relative"] = "relative"


class FamiliesConfig(StrictModel):
    gits: GITSFamilyConfig = Field(default_factory=GITSFamilyConfig)
    epd: EPDFamilyConfig = Field(default_factory=EPDFamilyConfig)
