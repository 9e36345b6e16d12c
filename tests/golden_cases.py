"""Reading the reference cases in AMED_GOLDEN_DIR (default ../shared/golden) and running them here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from amed_core.denoisers import GaussianMixtureDenoiser

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("AMED_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


def case_files() -> list[Path]:
    return sorted(GOLDEN_DIR.glob("*.npz")) if GOLDEN_DIR.is_dir() else []


def load_case(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as d:
        case = {k: d[k] for k in d.files}
    for k, v in list(case.items()):
        if v.ndim == 0:
            case[k] = v.item()
    return case


_MODELS: dict[str, GaussianMixtureDenoiser] = {}


def model_for(case: dict) -> GaussianMixtureDenoiser:
    name = case["model"]
    if name not in _MODELS:
        _MODELS[name] = GaussianMixtureDenoiser.from_npz(GOLDEN_DIR / "models" / f"{name}.npz", name=name)
    return _MODELS[name]


def schedule_kwargs(case: dict) -> dict:
    kw = dict(schedule_type=case["schedule_type"], schedule_rho=float(case["schedule_rho"]))
    if case["schedule_type"] == "discrete":
        kw.update(alphas_cumprod=case["alphas_cumprod"].tolist(), epsilon_t=float(case["epsilon_t"]))
    return kw


def solver_call(case: dict) -> tuple[str, dict]:
    """Map a case's fields onto our solver name and keyword options."""
    s = case["solver"]
    common = dict(afs=bool(case["afs"]), denoise_to_zero=bool(case["denoise_to_zero"]), return_trajectory=True)
    if s in ("euler", "heun"):
        return s, common
    if s == "dpm":
        return "dpm2", dict(common, r=float(case["dpm_r"]))
    if s in ("ipndm", "ipndm_v"):
        return s, dict(common, max_order=int(case["max_order"]))
    if s == "dpmpp":
        return s, dict(common, max_order=int(case["max_order"]), predict_x0=bool(case["predict_x0"]),
                       lower_order_final=bool(case["lower_order_final"]),
                       dynamic_thresholding=bool(case["dynamic_thresholding"]))
    if s == "unipc":
        return s, dict(common, max_order=int(case["max_order"]), predict_x0=bool(case["predict_x0"]),
                       lower_order_final=bool(case["lower_order_final"]),
                       dynamic_thresholding=bool(case["dynamic_thresholding"]), variant=str(case["variant"]))
    if s == "deis":
        return s, dict(common, max_order=int(case["max_order"]), deis_mode=str(case["deis_mode"]))
    raise KeyError(s)


def tolerance(case: dict, reference: np.ndarray) -> float:
    if case["solver"] == "deis" and case.get("deis_mode") == "tab":
        return 1e-3 * (1 + float(np.abs(reference).max()))
    return 1e-8 * (1 + float(np.abs(reference).max()))


def noise(case: dict) -> torch.Tensor:
    return torch.from_numpy(np.asarray(case["noise"], dtype=np.float64))
