"""Learning-rate schedules by name, stepped once per optimizer step (not per epoch).

A schedule is planned for `max_epochs * steps_per_epoch` optimizer steps; early stopping just
ends it sooner. Each one is a function `(step, plan) -> multiplier of the base lr`, where `step`
counts optimizer steps from 0; `build_scheduler` wraps it in torch's LambdaLR. Adding a schedule
is registering one such function:

    @SCHEDULERS.register("exponential")
    def exponential(step: int, plan: SchedulePlan) -> float:
        return plan.lr_gamma ** (step / plan.steps_per_epoch)

Warm-up (`warmup_epochs`, fractional allowed) is shared: over its steps the multiplier rises
linearly from 0.1 (lr/10, not 0: a step at lr 0 is a wasted step) to 1.0, multiplying the
schedule's own value; decay that depends on progress (cosine) starts when warm-up ends. A
schedule registered with `own_warmup=True` (onecycle) uses the warm-up length itself instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imgcls.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch.optim.lr_scheduler import LambdaLR

WARMUP_START = 0.1  # warm-up's first multiplier: it starts at lr / 10
ONECYCLE_RISE = 0.3  # onecycle's rising share of the steps when no warm-up is given (torch's)
ONECYCLE_DIV = 25.0  # onecycle starts at lr / 25 (torch's div_factor)
ONECYCLE_FINAL_DIV = 1e4  # and ends at lr / 25 / 1e4 (torch's final_div_factor)


@dataclass(frozen=True)
class SchedulePlan:
    """What a schedule needs to know of the run it shapes."""

    steps_per_epoch: int  # optimizer steps per epoch: the number of training batches
    max_epochs: int
    warmup_epochs: float = 0.0  # epochs of linear warm-up; fractional allowed
    lr_gamma: float = 0.1  # step: factor applied at each step boundary
    lr_step_epochs: int = 0  # step: epochs between boundaries; 0: a third of them

    @property
    def total_steps(self) -> int:
        return self.max_epochs * self.steps_per_epoch

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)


# schedule(step, plan) -> multiplier of the base learning rate at optimizer step `step`
Schedule = Callable[[int, SchedulePlan], float]

SCHEDULERS: Registry[Schedule] = Registry("scheduler")


def warmup_factor(step: int, plan: SchedulePlan) -> float:
    if step >= plan.warmup_steps:
        return 1.0
    return WARMUP_START + (1 - WARMUP_START) * step / plan.warmup_steps


def _cosine_anneal(start: float, end: float, progress: float) -> float:
    """From `start` at progress 0 to `end` at progress 1, along half a cosine."""
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2


@SCHEDULERS.register("none")
def constant(step: int, plan: SchedulePlan) -> float:
    return 1.0


@SCHEDULERS.register("step")
def step_decay(step: int, plan: SchedulePlan) -> float:
    """Multiply by lr_gamma every lr_step_epochs epochs, counted from the first step."""
    epochs = plan.lr_step_epochs or max(1, plan.max_epochs // 3)
    return plan.lr_gamma ** (step // (epochs * plan.steps_per_epoch))


@SCHEDULERS.register("cosine")
def cosine(step: int, plan: SchedulePlan) -> float:
    """From 1 at the end of warm-up to 0 at the end of the plan (the last step itself uses a
    small positive rate, not 0)."""
    length = max(1, plan.total_steps - plan.warmup_steps)
    progress = min(max(step - plan.warmup_steps, 0) / length, 1.0)
    return _cosine_anneal(1.0, 0.0, progress)


@SCHEDULERS.register("onecycle", own_warmup=True)
def onecycle(step: int, plan: SchedulePlan) -> float:
    """torch's OneCycleLR policy (two phases, cosine annealing), peaking at lr: rise from lr/25
    over the warm-up (30% of the steps when there is none), then fall to lr/25/1e4 at the last
    step. Written as a multiplier because torch's class divides by zero when the rising phase
    is a single step; momentum is not cycled, so a searched momentum keeps its meaning."""
    rise = plan.warmup_epochs / plan.max_epochs if plan.warmup_epochs > 0 else ONECYCLE_RISE
    peak = rise * plan.total_steps - 1  # the step at the peak, as torch places it (a float)
    last = plan.total_steps - 1
    low = 1 / ONECYCLE_DIV
    if step <= peak:
        return _cosine_anneal(low, 1.0, step / peak) if peak > 0 else 1.0
    if last <= peak:
        return 1.0
    return _cosine_anneal(1.0, low / ONECYCLE_FINAL_DIV, min((step - peak) / (last - peak), 1.0))


def lr_multiplier(name: str, plan: SchedulePlan) -> Callable[[int], float]:
    """The multiplier of the base learning rate at each optimizer step, warm-up included."""
    entry = SCHEDULERS.entry(name)
    schedule = entry.obj
    if entry.meta.get("own_warmup", False):
        return lambda step: schedule(step, plan)
    return lambda step: warmup_factor(step, plan) * schedule(step, plan)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, plan: SchedulePlan
                    ) -> LambdaLR:
    """A scheduler to step after every optimizer step. It sets the first step's rate at once."""
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, lr_multiplier(name, plan))
