"""GS, the Generalized Solver (Oganov et al., "GAS: Improving Discretization of Diffusion ODEs via Generalized
Adversarial Solver", arXiv 2510.17699; reference: github 3145tttt/GAS @ f090ede, MIT, ``src/gas/generalized_solver.py``,
``gs_wrapper.py``, ``base_model.py``). GS learns the whole discretisation of an NFE-N sampler: the time grid (N - 1
logits), a model time per evaluation decoupled from the grid (N offsets) and additive corrections to DPM-Solver++(3M)'s
multistep coefficients over the whole history (2 x order x N). It contains LD3 (grid + model times, coefficients
frozen) and an S4S-style update (``theory=False``) as special cases.

Notation. GS works in VP time t in [t_eps, 1] of a linear VP schedule fitted to the denoiser's sigma range
(:class:`VPRemap`, the reference's ``EDMModel.setup_net_params``): log alpha_t = -beta_d t^2 / 4 - beta_min t / 2,
std_t = sqrt(1 - alpha_t^2), lambda_t = log alpha_t - log std_t, EDM sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1).
The state x is VP-scaled (x = alpha_t x_edm). With N steps there are N + 1 grid points t_0 = 1 > t_1 > ... > t_N = t_eps
and N denoiser calls, at t_0 .. t_{N-1}:

    grid      mu_j = sigmoid(logit_j)(1 - 2e) + e,  e = 1e-5,  s_j = (1 - prod_{i<=j} mu_i)(1 - t_eps) + t_eps,
              t = reverse([t_eps, s_1, ..., s_{N-1}, 1])       (decreasing for any logits; :func:`timesteps_from_logits`)
    model     t' = t_k + t_couple_k,  D = D_edm(x / alpha(t'); sigma(t')),  eps = (x - alpha(t') D) / std(t'),
              M_k = x0 = (x - std(t_k) eps) / alpha(t_k)        (converted back with the *unshifted* t_k)
    update    x_{k+1} = sum_j coef_state[k, j] X_j + sum_j coef_model[k, j] M_j   (X_0 = x_k, X_1 = x_{k-1}, ...;
              M_0 = M_k, M_1 = M_{k-1}, ...; p = min(k + 1, order) of each)

The update is linear in the history; :func:`step_coefficients` builds its coefficients from the grid and the learned
corrections c_i, a_i (i = 1..order, one value per step) as the reference's ``first_update`` / ``second_update`` /
``unbound_update`` (``theory=True``: DPM-Solver++(3M) in lambda plus corrections, warm-up orders 1, 2, no lower-order
final step) or ``not_theory_update`` (``theory=False``, the S4S "LMS + PC" form) apply it. Writing the update as
coefficients is ours (the reference applies it term by term); the golden cases store the coefficients the reference
applied (read off with one-hot histories) and both forms agree to rounding.

Where we follow the reference's quirks by default (:class:`GSConfig`; each has an option that departs):

- **VP re-mapping of an EDM net** (``end="reference"``). sigma_lo = max(sigma_ref(t_eps), net sigma_min) with the
  paper's VP sigma_ref (beta_d 19.9, beta_min 0.1), so the student ends at sigma 0.0105 for t_eps = 1e-3 (0.0032 for
  1e-4), not at the net's 0.002. ``end="net"`` solves the betas so that the schedule ends at the net's own sigma_min.
- **The S4S update scales by a twice** (``s4s_rescale="twice"``): its "PC" part multiplies the whole LMS result by a
  = std(t_{k+1}) / std(t_k) again and adds C a_i M_i from the same predictions, so at initialisation the S4S update is
  a^2 x + a (the DPM-Solver++ increment), not DPM-Solver++ (on the last step a ~ 0.01: samples near zero).
  ``s4s_rescale="once"`` applies a once; then the S4S mode at init *is* DPM-Solver++(3M).
- **Model-time offsets are not clipped** (``clip_model_time=False``): t' > 1 lets the net see sigma > sigma_max;
  -2 beta_min / beta_d < t' < 0 gives sigma(t')^2 < 0 and NaN samples. ``clip_model_time=True`` clamps t' to
  [t_eps, 1] (the range the grid itself lives in).
- **The output is the VP state at t_eps** (``output="vp"``): alpha(t_eps) x_edm, no final division by alpha.
  ``output="edm"`` returns the EDM state x_edm (and an EDM trajectory), as every other sampler here does.
- **The start is the VP prior** (``start="vp"``): the family sampler starts from x_vp = noise, i.e. the EDM state
  noise sqrt(1 + sigma_max^2) (80.006 noise for sigma_max 80), where the stored teachers start at noise sigma_max.
  ``start="edm"`` starts at noise sigma_max like every other sampler here.

Where we depart (no option):

- **S4S mode with order <= 2** crashes in the reference's constructor (``init_coefs`` writes ``c2_diff`` / ``c3_diff``,
  which exist only for order >= 3). Here only the rows that exist are initialised, i.e. the values the reference would
  compute if it did not crash.
- **dtype**: the reference's parameters, grid and states are float32 on GPU (its net is cast to float32); ours are
  float64 parameters and the state's own dtype (the golden cases are float64).
- **NFE-1 grids**: the reference's main.py takes 4 <= NFE <= 10 (generate.py any); any N >= 1 works here.
- ``denoise_to_zero`` adds one evaluation D(x_edm; sigma(t_eps)) and returns its (EDM) output; the reference has no such
  step. ``afs`` is refused (GS has no analytical first step).

(Over 400 lines on purpose: one job, the sampler; the VP re-mapping, the grid parameterisation and the update form
share the notation and the quirks above, and the golden cases pin them together. Training is
:mod:`amed_core.methods.gs.train`.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..._fields import check_fields
from ...schedules import schedule_to_sigmas
from ...solvers import SolveResult, StepInfo

__all__ = ["GSConfig", "GSParams", "GSResult", "GSStepValues", "VPRemap", "END_RULES", "gs", "gs_sample",
           "logits_from_timesteps", "s4s_init_coefficients", "step_coefficients", "step_values",
           "timesteps_from_logits", "EPS_MU_OFFSET", "REFERENCE_VP"]

EPS_MU_OFFSET = 1e-5                       # the reference's logit squashing margin (gs_wrapper.eps_mu_offset)
REFERENCE_VP = (19.9, 0.1)                 # (beta_d, beta_min) of the paper's VP checkpoints: sigma_ref(t)
END_RULES = ("reference", "net")


def _vp_sigma(beta_d: float, beta_min: float, t: float) -> float:
    return (math.exp(0.5 * beta_d * t * t + beta_min * t) - 1.0) ** 0.5


# ---------------------------------------------------------------------------------------------
# The VP schedule GS runs in

@dataclass(frozen=True)
class VPRemap:
    """The linear VP schedule GS solves in, fitted to the denoiser's sigma range (the reference's
    ``EDMModel.setup_net_params``): sigma(t_eps) = sigma_lo and sigma(1) = sigma_hi.

    ``for_net(net_sigma_min, net_sigma_max, t_eps, end)``: end="reference" takes sigma_lo = max(sigma_ref(t_eps),
    net_sigma_min) and sigma_hi = min(sigma_ref(1), net_sigma_max), sigma_ref the paper's VP (beta_d 19.9, beta_min
    0.1); end="net" takes sigma_lo = net_sigma_min (the student then ends at the net's own sigma_min).
    """

    t_eps: float
    beta_d: float
    beta_min: float
    sigma_lo: float
    sigma_hi: float

    @classmethod
    def for_net(cls, net_sigma_min: float, net_sigma_max: float, t_eps: float = 1e-3, end: str = "reference") -> "VPRemap":
        for name, v in (("net_sigma_min", net_sigma_min), ("net_sigma_max", net_sigma_max), ("t_eps", t_eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        if not net_sigma_min < net_sigma_max:
            raise ValueError(f"net_sigma_min ({net_sigma_min}) must be below net_sigma_max ({net_sigma_max})")
        if not t_eps < 1:
            raise ValueError(f"t_eps (the student's end time in VP time) must lie in (0, 1), got {t_eps!r}")
        if end not in END_RULES:
            raise ValueError(f"end must be one of {END_RULES}, got {end!r}")
        bd, bm = REFERENCE_VP
        lo = max(_vp_sigma(bd, bm, t_eps), float(net_sigma_min)) if end == "reference" else float(net_sigma_min)
        hi = min(_vp_sigma(bd, bm, 1.0), float(net_sigma_max))
        if not lo < hi:
            raise ValueError(f"the VP re-mapping needs sigma(t_eps) = {lo:.6g} below sigma(1) = {hi:.6g}; "
                             f"lower t_eps or check the net's sigma range")
        beta_d = 2 * (math.log(lo ** 2 + 1) / t_eps - math.log(hi ** 2 + 1)) / (t_eps - 1)
        beta_min = math.log(hi ** 2 + 1) - 0.5 * beta_d
        if not beta_d * t_eps + beta_min > 0:  # sigma(t) must increase on [t_eps, 1]
            raise ValueError(f"no increasing VP schedule reaches sigma {lo:.6g} at t_eps={t_eps} and {hi:.6g} at 1 "
                             f"(beta_d {beta_d:.6g}, beta_min {beta_min:.6g}); raise t_eps or use end='reference'")
        return cls(float(t_eps), float(beta_d), float(beta_min), float(lo), float(hi))

    # Schedules of a VP time tensor t (the reference's NoiseScheduleVP('linear') and EDMModel formulas, same rounding).
    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t ** 2 * self.beta_d - 0.5 * t * self.beta_min

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_alpha(t))

    def std(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(1. - torch.exp(2. * self.log_alpha(t)))

    def lam(self, t: torch.Tensor) -> torch.Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1. - torch.exp(2. * la))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The EDM noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (NaN where the root is of a
        negative number: the reference's behaviour for t' < 0, see ``clip_model_time``)."""
        return (torch.exp(0.5 * self.beta_d * t ** 2 + self.beta_min * t) - 1) ** 0.5

    def edm_scale(self, t: torch.Tensor) -> torch.Tensor:
        """s(t) = 1 / sqrt(1 + sigma(t)^2): x_vp = s(t) x_edm (the same number as alpha(t), rounded otherwise)."""
        return 1 / (1 + self.sigma(t) ** 2).sqrt()

    def time_of_sigma(self, sigma) -> torch.Tensor:
        """The VP time t with sigma(t) = sigma (float64): the positive root of beta_d t^2 / 2 + beta_min t =
        log(1 + sigma^2)."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        c = torch.log1p(s * s)
        return 2 * c / (self.beta_min + torch.sqrt(self.beta_min ** 2 + 2 * self.beta_d * c))

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The grid parameterisation

def timesteps_from_logits(mu_logit: torch.Tensor, t_eps: float, eps: float = EPS_MU_OFFSET) -> torch.Tensor:
    """(N+1,) decreasing VP times from N-1 logits (stick-breaking, the paper's eq. 14): t_0 = 1, t_N = t_eps exactly."""
    mu = torch.sigmoid(mu_logit) * (1 - 2 * eps) + eps
    s = (1 - torch.cumprod(mu, 0)) * (1 - t_eps) + t_eps
    ends = torch.ones_like(s[:1]) if s.numel() else torch.ones(1, dtype=mu_logit.dtype, device=mu_logit.device)
    return torch.cat([ends * 0 + t_eps, s, ends]).flip(0)


def logits_from_timesteps(timesteps, t_eps: float, eps: float = EPS_MU_OFFSET) -> torch.Tensor:
    """The inverse of :func:`timesteps_from_logits` for a decreasing grid from 1 to t_eps (N+1 points; the end points
    are not stored). ValueError unless the interior lies strictly inside (t_eps, 1) and strictly decreases."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).flip(0)          # increasing, t[0] = t_eps, t[-1] = 1
    inner = t[1:-1]
    if inner.numel() and (not torch.all(inner > t_eps) or not torch.all(inner < 1) or not torch.all(inner[1:] > inner[:-1])):
        raise ValueError("a GS grid's interior times must lie strictly between t_eps and 1 and strictly decrease")
    v = 1 - (inner - t_eps) / (1 - t_eps)
    ratio = v / torch.cat([torch.ones_like(v[:1]), v[:-1]])
    return torch.logit((ratio - eps) / (1 - 2 * eps))


# ---------------------------------------------------------------------------------------------
# Per-step values and the linear update

@dataclass
class GSStepValues:
    """The reference's ``calc_vals`` of step k (t_k -> t_{k+1}, order p): a = std_{k+1} / std_k, alpha_{k+1},
    h = lambda_{k+1} - lambda_k, phi_1 = expm1(-h); r0 (p >= 2), r1, phi_2, phi_3 (p >= 3); None where not computed."""

    a: torch.Tensor
    alpha: torch.Tensor
    h: torch.Tensor
    phi_1: torch.Tensor
    r0: Optional[torch.Tensor] = None
    r1: Optional[torch.Tensor] = None
    phi_2: Optional[torch.Tensor] = None
    phi_3: Optional[torch.Tensor] = None

    def row(self) -> list[float]:
        """[a, alpha, r0, r1, phi_1, phi_2, phi_3] as floats (NaN for None): the golden cases' ``calc_vals`` row."""
        return [float("nan") if v is None else float(v) for v in
                (self.a, self.alpha, self.r0, self.r1, self.phi_1, self.phi_2, self.phi_3)]


def step_values(remap: VPRemap, t: torch.Tensor, k: int, p: int) -> GSStepValues:
    """calc_vals of step k with history length p on the grid ``t`` (decreasing VP times)."""
    lam = remap.lam
    lam_k, lam_next = lam(t[k]), lam(t[k + 1])
    h = lam_next - lam_k
    out = GSStepValues(a=remap.std(t[k + 1]) / remap.std(t[k]), alpha=torch.exp(remap.log_alpha(t[k + 1])), h=h,
                       phi_1=torch.expm1(-h))
    if p >= 2:
        lam_1 = lam(t[k - 1])
        out.r0 = (lam_k - lam_1) / h
    if p >= 3:
        out.r1 = (lam_1 - lam(t[k - 2])) / h
        out.phi_2 = out.phi_1 / h + 1.
        out.phi_3 = out.phi_2 / h - 0.5
    return out


def step_coefficients(v: GSStepValues, p: int, c: torch.Tensor, a: torch.Tensor, *, theory: bool,
                      s4s_rescale: str = "twice") -> tuple[list, list]:
    """(coef_state, coef_model), p entries each: x_{k+1} = sum_j coef_state[j] X_j + sum_j coef_model[j] M_j.

    c, a: this step's corrections c_1.., a_1.. (at least p entries; entry i-1 is c_i). theory=True: the reference's
    first/second/unbound update (DPM-Solver++ in lambda plus corrections; note c_2 multiplies -D1_0 on a 2nd-order step
    and +D1 from 3rd order on, as there). theory=False: S4S, y = a X_0 + C sum c_i M_{i-1}, x' = a y + C sum a_i M_{i-1}
    with C = -alpha phi_1 (``s4s_rescale="once"``: x' = y + C sum a_i M_{i-1}); past states are not used."""
    al_phi1 = v.alpha * v.phi_1
    zero = torch.zeros_like(v.a)
    if not theory:
        C = -al_phi1
        scale = v.a if s4s_rescale == "twice" else 1.0
        state = [scale * v.a] + [zero] * (p - 1)
        model = [scale * C * c[i] + C * a[i] for i in range(p)]
        return state, model
    state = [v.a + a[0]] + [a[i] for i in range(1, p)]
    if p == 1:
        return state, [-(al_phi1 + c[0])]
    if p == 2:
        c2 = 0.5 * al_phi1 + c[1]
        return state, [-(al_phi1 + c[0]) - c2 / v.r0, c2 / v.r0]
    r0, r1 = v.r0, v.r1
    A = v.alpha * v.phi_2 + c[1]                       # multiplies D1 = D1_0 + r0/(r0+r1)(D1_0 - D1_1)
    B = v.alpha * v.phi_3 + c[2]                       # multiplies -D2 = -(D1_0 - D1_1)/(r0+r1)
    g0 = A * (1 + r0 / (r0 + r1)) - B / (r0 + r1)      # coefficient of D1_0 = (M_0 - M_1)/r0
    g1 = -A * (r0 / (r0 + r1)) + B / (r0 + r1)         # coefficient of D1_1 = (M_1 - M_2)/r1
    model = [-(al_phi1 + c[0]) + g0 / r0, -g0 / r0 + g1 / r1, -g1 / r1] + [c[i] for i in range(3, p)]
    return state, model


def s4s_init_coefficients(remap: VPRemap, t: torch.Tensor, order: int) -> torch.Tensor:
    """(order, N) initial c of the S4S mode on grid ``t``: at step k the DPM-Solver++ multistep weights of M_0, M_1,
    M_2 (orders 1, 2, 3M as the theory mode warms up) divided by C = -alpha phi_1; rows 4.. stay 0 (the reference's
    ``init_coefs``; it computes them once, on the initial grid, and never again)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    N = t.shape[0] - 1
    out = torch.zeros(order, N, dtype=torch.float64)
    zeros = torch.zeros(max(order, 3), dtype=torch.float64)
    for k in range(N):
        p = min(k + 1, order)
        v = step_values(remap, t, k, p)
        _, model = step_coefficients(v, min(p, 3), zeros, zeros, theory=True)
        C = -v.alpha * v.phi_1
        for i, m in enumerate(model[: min(order, 3)]):
            out[i, k] = m / C
    return out


# ---------------------------------------------------------------------------------------------
# Configuration and parameters

@dataclass(frozen=True)
class GSConfig:
    """Everything about a GS sampler but its learned tensors (JSON round-trip: to_dict / from_dict).

    steps: N = NFE; order: history length (1..N; the reference's scripts use N); theory: DPM-Solver++-based update
    (True, the paper's configs) or the S4S form; t_eps: the student's end time in VP time (the reference: 1e-3 for
    CIFAR-10, 1e-4 for FFHQ / AFHQv2); net_sigma_min / net_sigma_max: the denoiser's sigma range the VP schedule is
    fitted to; end, s4s_rescale, clip_model_time, output, start: the reference's quirks and their fixes (module
    docstring); eps_mu_offset: the logit squashing margin.
    """

    steps: int
    order: int
    net_sigma_min: float
    net_sigma_max: float
    theory: bool = True
    t_eps: float = 1e-3
    end: str = "reference"
    s4s_rescale: str = "twice"
    clip_model_time: bool = False
    output: str = "vp"
    start: str = "vp"
    eps_mu_offset: float = EPS_MU_OFFSET

    def __post_init__(self):
        def integer(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        integer("steps", 1, 1000)
        integer("order", 1, self.steps)
        for name in ("theory", "clip_model_time"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, allowed in (("end", END_RULES), ("s4s_rescale", ("twice", "once")), ("output", ("vp", "edm")),
                              ("start", ("vp", "edm"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        e = self.eps_mu_offset
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 < e < 0.5:
            raise ValueError(f"eps_mu_offset must lie in (0, 0.5), got {e!r}")
        self.remap()  # validates t_eps and the sigma range

    def remap(self) -> VPRemap:
        return VPRemap.for_net(self.net_sigma_min, self.net_sigma_max, self.t_eps, self.end)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GSConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"a GS config must be a JSON object, got {type(d).__name__}")
        check_fields(cls, d, "GS config")
        missing = sorted({"steps", "order", "net_sigma_min", "net_sigma_max"} - set(d))
        if missing:
            raise ValueError(f"GS config lacks {missing}")
        return cls(**dict(d))


class GSParams(torch.nn.Module):
    """GS's learned tensors (the reference's ``GSWrapper`` parameters) with their :class:`GSConfig`.

    mu_logit (N-1): the grid logits; t_couple (N): model-time offsets; c_diff, a_diff (order, N): row i-1 is the
    reference's ``c{i}_diff`` / ``a{i}_diff``, column k is step k. ``GSParams(config)`` is the reference's
    initialisation (:meth:`reference_init`); :meth:`from_grid` starts from another grid (e.g. the panel's best).
    Float64 by default (the reference: float32).
    """

    TENSORS = ("mu_logit", "t_couple", "c_diff", "a_diff")

    def __init__(self, config: GSConfig, *, timesteps=None, dtype: torch.dtype = torch.float64):
        super().__init__()
        if not isinstance(config, GSConfig):
            raise ValueError(f"config must be a GSConfig, got {type(config).__name__}")
        self.config = config
        self.remap = config.remap()
        N, order = config.steps, config.order
        if timesteps is None:  # the reference's init: uniform in VP time
            timesteps = torch.linspace(1., config.t_eps, N + 1, dtype=torch.float64)
        t = torch.as_tensor(timesteps, dtype=torch.float64)
        if t.shape != (N + 1,):
            raise ValueError(f"an initial GS grid for {N} steps has {N + 1} points, got shape {tuple(t.shape)}")
        if float(t[0]) != 1.0 or float(t[-1]) != config.t_eps:
            raise ValueError(f"an initial GS grid runs from t=1 to t_eps={config.t_eps}, got {float(t[0])} .. {float(t[-1])}")
        logits = logits_from_timesteps(t, config.t_eps, config.eps_mu_offset)
        self.mu_logit = torch.nn.Parameter(logits.to(dtype))
        self.t_couple = torch.nn.Parameter(torch.zeros(N, dtype=dtype))
        c = s4s_init_coefficients(self.remap, timesteps_from_logits(logits, config.t_eps, config.eps_mu_offset), order) \
            if not config.theory else torch.zeros(order, N, dtype=torch.float64)
        self.c_diff = torch.nn.Parameter(c.to(dtype))
        self.a_diff = torch.nn.Parameter(torch.zeros(order, N, dtype=dtype))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def reference_init(cls, config: GSConfig, dtype: torch.dtype = torch.float64) -> "GSParams":
        """The reference's initial values: the time-uniform grid linspace(1, t_eps, N + 1), no offsets, zero
        corrections (theory) or DPM-Solver++ weights / C (S4S)."""
        return cls(config, dtype=dtype)

    @classmethod
    def from_grid(cls, config: GSConfig, sigmas, dtype: torch.dtype = torch.float64) -> "GSParams":
        """Start from a sigma grid of N + 1 points (e.g. the panel's best schedule at this NFE): its interior points
        mapped to VP times (the end points are GS's own, t = 1 and t_eps); ValueError naming what does not fit when
        the grid cannot be expressed (wrong length, or an interior point outside (sigma(t_eps), sigma(1)))."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
        N = config.steps
        if s.shape[0] != N + 1:
            raise ValueError(f"a GS grid for NFE {N} has {N + 1} points; this one has {s.shape[0]} (a solver with "
                             f"2 evaluations per step or an analytical first step cannot be expressed)")
        remap = config.remap()
        inner = s[1:-1]
        if inner.numel() and not (torch.all(inner > remap.sigma_lo) and torch.all(inner < remap.sigma_hi)):
            raise ValueError(f"the grid's interior sigmas {[round(float(v), 6) for v in inner]} must lie strictly "
                             f"between GS's end sigmas {remap.sigma_lo:.6g} and {remap.sigma_hi:.6g}")
        t = torch.cat([torch.ones(1, dtype=torch.float64), remap.time_of_sigma(inner),
                       torch.full((1,), config.t_eps, dtype=torch.float64)])
        return cls(config, timesteps=t, dtype=dtype)

    @classmethod
    def from_tensors(cls, config: GSConfig, tensors: Mapping[str, torch.Tensor]) -> "GSParams":
        """Parameters with given tensors (a checkpoint's): shapes checked against the config."""
        missing = sorted(set(cls.TENSORS) - set(tensors))
        if missing:
            raise ValueError(f"GS parameters lack {missing}")
        dtype = torch.as_tensor(tensors["mu_logit"]).dtype
        p = cls(config, dtype=dtype if dtype.is_floating_point else torch.float64)
        with torch.no_grad():
            for name in cls.TENSORS:
                want = tuple(getattr(p, name).shape)
                got = torch.as_tensor(tensors[name])
                if tuple(got.shape) != want:
                    raise ValueError(f"GS tensor {name} has shape {tuple(got.shape)}; steps={config.steps}, "
                                     f"order={config.order} need {want}")
                getattr(p, name).copy_(got)
        return p

    # -- the schedule ---------------------------------------------------------------------------
    def timesteps(self) -> torch.Tensor:
        """(N+1,) decreasing VP times t_0 = 1 .. t_N = t_eps (differentiable in the logits)."""
        return timesteps_from_logits(self.mu_logit, self.config.t_eps, self.config.eps_mu_offset)

    def model_times(self, timesteps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N,) t_k + t_couple_k: where the denoiser is evaluated (clamped to [t_eps, 1] with clip_model_time)."""
        t = self.timesteps() if timesteps is None else timesteps
        mt = t[:-1] + self.t_couple
        return mt.clamp(self.config.t_eps, 1.0) if self.config.clip_model_time else mt

    def sigmas(self) -> torch.Tensor:
        """(N+1,) the grid as EDM sigmas (float64, detached): sigma_hi .. sigma_lo."""
        with torch.no_grad():
            return self.remap.sigma(self.timesteps().double())

    def model_sigmas(self) -> torch.Tensor:
        """(N,) the EDM sigma of each model evaluation (float64, detached)."""
        with torch.no_grad():
            return self.remap.sigma(self.model_times().double())

    def export_sigmas(self, append_zero: bool = True) -> list[float]:
        """The learned grid for diffusers / k-diffusion (:func:`amed_core.schedules.schedule_to_sigmas`: a
        decreasing list of floats, with the trailing 0.0 k-diffusion expects unless ``append_zero=False``, which
        diffusers' ``set_timesteps(sigmas=...)`` wants). Only the grid travels: the decoupled model times and the
        coefficient corrections have no place in those libraries, so a sampler there runs its own solver on it."""
        return schedule_to_sigmas(self.sigmas(), append_zero=append_zero)

    def start_state(self, noise: torch.Tensor) -> torch.Tensor:
        """The VP start state from standard normal noise: noise itself (start="vp", the reference) or
        noise sigma_max alpha(1) (start="edm", the EDM start every other sampler uses)."""
        if self.config.start == "vp":
            return noise
        one = torch.ones((), dtype=torch.float64)
        return noise * float(self.remap.sigma_hi * self.remap.alpha(one))

    def describe(self) -> dict:
        """The grid, model times and their sigmas as plain lists (JSON)."""
        with torch.no_grad():
            t = self.timesteps().double()
            return {"timesteps": [float(v) for v in t], "sigmas": [float(v) for v in self.sigmas()],
                    "model_times": [float(v) for v in self.model_times(t)],
                    "model_sigmas": [float(v) for v in self.model_sigmas()]}


# ---------------------------------------------------------------------------------------------
# Sampling

@dataclass
class GSResult(SolveResult):
    """:class:`SolveResult` plus what the reference's run exposes: the data predictions M_k (N, B, ...) when asked
    for, the grid (VP times), the model times and each step's (coef_state, coef_model)."""

    x0_pred: Optional[torch.Tensor] = None
    timesteps: Optional[torch.Tensor] = None
    model_times: Optional[torch.Tensor] = None
    coefficients: Optional[list] = None
    values: Optional[list] = None


def _check_params(policy) -> GSParams:
    if not isinstance(policy, GSParams):
        raise ValueError(f"GS needs policy= a GSParams (its grid, model times and coefficients), got "
                         f"{type(policy).__name__}")
    return policy


def gs_sample(denoiser, x: torch.Tensor, params: GSParams, *, class_labels=None, return_trajectory: bool = False,
              return_x0: bool = False, callback: Callable[[StepInfo], None] | None = None) -> GSResult:
    """GS from the VP state ``x`` at t = 1 (the reference's ``GeneralizedSolver.sample``; ``x`` is its ``noise``).

    Returns the VP state at t_eps (``params.config.output == "vp"``, the reference) or the EDM state; the trajectory
    (N+1 states) is in the same scaling. Differentiable in ``x`` and every parameter (training); no ``no_grad`` inside.
    """
    params = _check_params(params)
    cfg, remap = params.config, params.remap
    if not torch.is_tensor(x) or x.ndim < 2:
        raise ValueError("x must be a batched tensor (B, ...): the VP state at t = 1")
    N, order = cfg.steps, cfg.order
    t_own = params.timesteps()
    t, mt = t_own.to(device=x.device), params.model_times(t_own).to(device=x.device)
    c_all = params.c_diff.to(device=x.device)
    a_all = params.a_diff.to(device=x.device)
    nfe = 0

    def model(xs: torch.Tensor, k: int) -> torch.Tensor:
        nonlocal nfe
        tk, tp = t[k], mt[k]
        sig = remap.sigma(tp)
        D = denoiser(xs / remap.edm_scale(tp).to(xs.dtype), sig.to(xs.dtype), class_labels)
        nfe += 1
        eps = (xs - remap.alpha(tp).to(xs.dtype) * D) / remap.std(tp).to(xs.dtype)
        return (xs - remap.std(tk).to(xs.dtype) * eps) / remap.alpha(tk).to(xs.dtype)

    X, M = [x], [model(x, 0)]
    states = [x] if return_trajectory else None
    preds = [M[0]] if return_x0 else None
    coefs, vals = [], []
    for k in range(N):
        p = min(k + 1, order)
        v = step_values(remap, t, k, p)
        cs, cm = step_coefficients(v, p, c_all[:, k], a_all[:, k], theory=cfg.theory, s4s_rescale=cfg.s4s_rescale)
        coefs.append((cs, cm))
        vals.append(v)
        x_next = sum(w.to(x.dtype) * s for w, s in zip(cs, X)) + sum(w.to(x.dtype) * m for w, m in zip(cm, M))
        if states is not None:
            states.append(x_next)
        if callback is not None:
            callback(StepInfo(k, float(remap.sigma(t[k].detach())), float(remap.sigma(t[k + 1].detach())), x_next,
                              M[0], nfe))
        if k == N - 1:  # no evaluation at t_eps (the reference's last step)
            X = [x_next]
            break
        X = [x_next] + X[: order - 1]
        M = [model(x_next, k + 1)] + M[: order - 1]
        if preds is not None:
            preds.append(M[0])
    out = X[0]
    traj = torch.stack(states) if states is not None else None
    if cfg.output == "edm":
        scale = remap.alpha(t).to(x.dtype)
        out = out / scale[-1]
        if traj is not None:
            traj = traj / scale.reshape(-1, *([1] * x.ndim))
    return GSResult(x=out, nfe=nfe, trajectory=traj, x0_pred=torch.stack(preds) if preds is not None else None,
                    timesteps=t.detach(), model_times=mt.detach(), coefficients=coefs, values=vals)


def gs(denoiser, x, sigmas, *, policy, class_labels=None, afs=False, denoise_to_zero=False, return_trajectory=False,
       callback: Callable[[StepInfo], None] | None = None) -> GSResult:
    """GS in the shared solver signature: ``x`` is the EDM state at ``sigmas[0]`` (= sigma(1)); ``sigmas`` is the
    policy's own grid (``policy.sigmas()``) or None. The learned grid lives in ``policy`` (a :class:`GSParams`), so a
    different ``sigmas`` is refused. ``nfe`` = N (+1 with ``denoise_to_zero``, which returns D(x_edm; sigma(t_eps))).
    The output's scaling follows ``policy.config.output`` (the reference: the VP state)."""
    params = _check_params(policy)
    if afs:
        raise ValueError("GS has no analytical first step: afs must be False")
    own = params.sigmas()
    if sigmas is not None:
        s = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
        if s.shape != own.shape or not torch.allclose(s, own, rtol=1e-9, atol=0):
            raise ValueError(f"GS samples on its learned grid ({own.shape[0]} points, sigma {float(own[0]):.6g} .. "
                             f"{float(own[-1]):.6g}); pass sigmas=None or policy.sigmas()")
    one = torch.ones((), dtype=torch.float64)
    x_vp = x * params.remap.alpha(one).to(dtype=x.dtype, device=x.device)
    res = gs_sample(denoiser, x_vp, params, class_labels=class_labels, return_trajectory=return_trajectory,
                    callback=callback)
    if denoise_to_zero:
        t_end = torch.full((), params.config.t_eps, dtype=torch.float64)
        x_edm = res.x if params.config.output == "edm" else res.x / params.remap.alpha(t_end).to(res.x.dtype)
        res.x = denoiser(x_edm, params.remap.sigma(t_end).to(x_edm.dtype), class_labels)
        res.nfe += 1
        if res.trajectory is not None:
            res.trajectory = torch.cat([res.trajectory, res.x[None]])
    return res
