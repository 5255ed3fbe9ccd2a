"""Optimizers by name. `momentum` is SGD's momentum and Adam's beta1 (its first-moment decay,
the same role), so one searched value means the same thing under every optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from imgcls.registry import Registry

OptimizerFactory = Callable[[Iterable[nn.Parameter], float, float, float], torch.optim.Optimizer]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float
        ) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def adam(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float
         ) -> torch.optim.Optimizer:
    # Adam's weight decay is an L2 term folded into the gradient; adamw decouples it.
    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float
          ) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name)(model.parameters(), lr, momentum, weight_decay)
