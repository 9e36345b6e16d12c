"""Adam for the small learned parts (the AMED predictor, EPD tables), without ``torch.optim``'s import cost.

Where we depart from the reference: the reference (and our earlier code) uses ``torch.optim.Adam``. Constructing any
``torch.optim.Optimizer`` imports ``torch._dynamo`` (its ``add_param_group`` is wrapped in ``torch._disable_dynamo``):
1.6 s of CPU in every fresh process, measured on the 2-core dev VM (``python -X importtime``), paid by each new Ray
worker that trains, on the critical path of every sweep, for a ~9k-parameter model whose whole training takes 0.05 s
in the scale benchmark. :class:`Adam` performs, op for op, the update of ``torch.optim.Adam``'s default single-tensor
path (``torch/optim/adam.py`` ``_single_tensor_adam`` with ``weight_decay=0``, ``amsgrad=False``, ``maximize=False``,
``capturable=False``, ``differentiable=False``, a float learning rate), so on the CPU its results are bit-identical to
``torch.optim.Adam``'s (``tests/test_amed.py::test_adam_matches_torch_optim_adam_bit_for_bit``). On CUDA
``torch.optim.Adam`` would take its multi-tensor (foreach) path, whose rounding differs in the last bits; ours stays
single-tensor there too (9k parameters: the kernel-launch count is irrelevant).
"""

from __future__ import annotations

from typing import Iterable

import torch


class Adam:
    """Adam (Kingma and Ba, 2015) with bias correction: ``torch.optim.Adam(params, lr, betas, eps)``'s arithmetic.

    Only what the training loops use: ``zero_grad(set_to_none=True)`` and ``step()``; parameters whose ``grad`` is
    None are skipped (as torch does).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam got an empty parameter list")
        if not lr >= 0.0:
            raise ValueError(f"Adam: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Adam: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"Adam: eps must be >= 0, got {eps}")
        self.lr, self.beta1, self.beta2, self.eps = float(lr), float(betas[0]), float(betas[1]), float(eps)
        self.state: dict[int, dict] = {}  # lazily, at a parameter's first step (as torch does)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2, lr, eps = self.beta1, self.beta2, self.lr, self.eps
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients")
            st = self.state.get(i)
            if st is None:
                st = self.state[i] = {"step": 0, "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                                      "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
            exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
            st["step"] += 1
            step = float(st["step"])  # torch: a float32 tensor read back with .item(), the same float below 2**24 steps
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2 ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)


def descend(loss: torch.Tensor, opt: "Adam", params) -> None:
    """One step of the trainers (``train_amed``, ``train_epd``): backpropagate ``loss``, zero the gradients' non-finite
    entries (as the reference does), then ``opt.step()``."""
    loss.backward()
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    opt.step()
