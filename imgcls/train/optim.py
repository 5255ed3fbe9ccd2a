"""Optimizers by name. `momentum` is SGD's momentum and Adam's beta1 (its first-moment decay,
the same role), so one searched value means the same thing under every optimizer.

An optimizer gets only the parameters with requires_grad=True: a frozen backbone is neither
updated nor decayed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from imgcls.errors import ConfigError
from imgcls.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

# factory(params, lr, momentum, weight_decay, nesterov) -> optimizer. torch is imported when
# an optimizer is made, not with the registry: a study's optimizer names are checked without it.
OptimizerFactory = Callable[[Iterable["nn.Parameter"], float, float, float, bool],
                            "torch.optim.Optimizer"]

OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
        nesterov: bool) -> torch.optim.Optimizer:
    # Nesterov with momentum 0 is plain SGD here, where torch raises: a search may sample
    # momentum 0 alongside nesterov=True, and that trial should train, not fail.
    import torch

    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


@OPTIMIZERS.register("adam")
def adam(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
         nesterov: bool) -> torch.optim.Optimizer:
    # Adam's weight decay is an L2 term folded into the gradient; adamw decouples it.
    # `nesterov` is an SGD setting: the Adam family ignores it.
    import torch

    return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
          nesterov: bool) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(name: str, model: nn.Module, lr: float, momentum: float,
                    weight_decay: float, nesterov: bool = False) -> torch.optim.Optimizer:
    """The optimizer `name` over the model's trainable parameters."""
    factory = OPTIMIZERS.get(name)
    params = trainable_parameters(model)
    if not params:
        raise ConfigError(f"{type(model).__name__} has no trainable parameters (all have "
                          "requires_grad=False): unfreeze at least the classifier head")
    return factory(params, lr, momentum, weight_decay, nesterov)
