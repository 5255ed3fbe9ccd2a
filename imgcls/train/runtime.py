"""Process-level settings a training run needs: the device and the seeds. Set by explicit
calls, never at import."""

from __future__ import annotations

import random

import numpy as np
import torch

from imgcls.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but no CUDA device is visible")
    return device


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (weight initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
