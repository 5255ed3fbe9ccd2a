"""How a model trains fast on its device: precision, memory format, compilation, kernel choice.

On CUDA a trial trains under bf16 autocast (fp16 with a gradient scaler on GPUs without bf16),
with channels_last activations (the layout tensor cores read without transposes),
cudnn.benchmark (the fastest convolution algorithm for each shape, picked once), and TF32 for
the float32 matmuls and convolutions that remain. On the CPU it trains as it is, in float32:
none of these pays there. `compile` wraps the model in torch.compile on any device; it costs
seconds to minutes of compilation per trial and pays back with small batches and ViTs.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def configure_cuda() -> None:
    """Process-wide CUDA settings for training: the fastest kernels, TF32 where float32 stays.

    cudnn.benchmark times the candidate algorithms on each new input shape once; a trial's
    shapes repeat every step, so that cost is paid in the first steps only.
    """
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


@dataclass(frozen=True)
class Acceleration:
    """The speed settings a trial trains with on `device`; the defaults change nothing."""

    device: torch.device
    precision: str = "float32"  # autocast dtype: float32 (no autocast), bfloat16, float16
    channels_last: bool = False  # activations and weights in NHWC
    compile: bool = False  # torch.compile the model

    @classmethod
    def for_device(cls, device: torch.device | str, *, compile: bool = False,
                   mixed_precision: bool = True) -> Acceleration:
        """The settings that pay on `device`. On CUDA this also configures the process
        (`configure_cuda`); `mixed_precision=False` keeps float32 (with TF32) there."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device, compile=compile)
        configure_cuda()
        precision = "float32"
        if mixed_precision:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            precision = "bfloat16" if bf16 else "float16"
        return cls(device, precision, channels_last=True, compile=compile)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move `model` to the device in its memory format, and return the module to call:
        `model` itself, or its compiled wrapper, which shares its parameters (so the state dict,
        the checkpoints and the logged model keep using `model`)."""
        layout = torch.channels_last if self.channels_last else torch.preserve_format
        model.to(self.device, memory_format=layout)
        return torch.compile(model) if self.compile else model  # type: ignore[return-value]

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the memory format the model was prepared for."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """Forward passes under this run in the mixed precision, if any."""
        with torch.autocast(self.device.type, dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            yield

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 has float32's range."""
        if self.precision != "float16":
            return None
        return torch.amp.GradScaler(self.device.type)

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_mb(self) -> float:
        """MiB: on CUDA, the most tensor memory held on the GPU since `reset_peak_memory`; on
        the CPU, the peak resident memory of the whole process so far (the OS keeps no
        per-trial peak)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on a CUDA device; None for the CPU, where the images already are."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def fits_on_device(nbytes: int, device: torch.device, budget: float) -> bool:
    """Whether `nbytes` of images may live on `device`: always on the CPU; on CUDA, within the
    `budget` share of the GPU's memory."""
    total = device_memory(device)
    return total is None or nbytes <= budget * total
