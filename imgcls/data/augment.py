"""Augmentation of whole training batches, as tensor ops on the batch's device.

Each image of a float batch (N, C, H, W) on the 0..1 scale gets its own random draw, taken from a
CPU `torch.Generator` and then moved to the batch's device, so a seed fixes every draw and CPU
and CUDA see the same numbers. Every field of `Augment` is a searchable hyperparameter whose
neutral value (0, or 1 for `crop_scale` and `sharpness`) turns that step off: it then draws
nothing and computes nothing.

The steps follow torchvision's per-image transforms, in this order:
flips -> RandomResizedCrop and RandomRotation as one resampling -> ColorJitter's brightness,
then contrast -> RandomAdjustSharpness. Where they differ:
- ColorJitter applies brightness and contrast in a random order; here brightness comes first,
  always (the two orders differ only through clamping and the grey level contrast blends to).
- The crop box is continuous (no rounding to whole pixels), and where a rotation uncovers the
  corners they show the image around the crop, where there is any, rather than black: crop and
  rotation share one `grid_sample`. Beyond the image the fill is zero, as in RandomRotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from imgcls.errors import ConfigError

__all__ = ["Augment"]

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (width / height)
CROP_TRIES = 10  # boxes drawn per image before falling back to the central one, as torchvision
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's RGB -> luma weights, for contrast's mean
# torchvision's smoothing kernel for sharpness: 1s around a 5, normalized to sum to 1
SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))

# field -> (low, high, whether low itself is allowed, the range in words for the error message)
_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "hflip": (0.0, 1.0, True, "a probability in [0, 1]"),
    "vflip": (0.0, 1.0, True, "a probability in [0, 1]"),
    "rotation": (0.0, 180.0, True, "degrees in [0, 180]"),
    "crop_scale": (0.0, 1.0, False, "an area fraction in (0, 1]; 1 turns cropping off"),
    "brightness": (0.0, math.inf, True, "a jitter >= 0; 0 turns it off"),
    "contrast": (0.0, math.inf, True, "a jitter >= 0; 0 turns it off"),
    "sharpness": (0.0, math.inf, True, "a factor >= 0 (0 blurs, 1 keeps, 2 sharpens)"),
    "sharpness_p": (0.0, 1.0, True, "a probability in [0, 1]"),
}


@dataclass(frozen=True)
class Augment:
    """Random augmentation of training batches; the defaults change nothing."""

    hflip: float = 0.0  # probability of mirroring an image left-right
    vflip: float = 0.0  # probability of mirroring an image upside down
    rotation: float = 0.0  # degrees: each image turns by an angle uniform in [-rotation, rotation]
    # RandomResizedCrop: the crop's share of the image area is uniform in [crop_scale, 1], its
    # aspect ratio log-uniform in CROP_RATIO, and it is resized back to the full size
    crop_scale: float = 1.0
    brightness: float = 0.0  # each image is scaled by a factor uniform in [max(0, 1-v), 1+v]
    contrast: float = 0.0  # blend with the image's mean grey, factor uniform in [max(0, 1-v), 1+v]
    sharpness: float = 1.0  # blend with a smoothed copy: 0 blurs, 1 keeps, 2 sharpens
    sharpness_p: float = 0.5  # probability of applying `sharpness` to an image (torchvision's p)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            low, high, low_ok, meaning = _RANGES[item.name]
            ok = isinstance(value, int | float) and not isinstance(value, bool) and (
                (low <= value if low_ok else low < value) and value <= high)
            if not ok:
                raise ConfigError(f"augmentation {item.name}={value!r} is out of range: "
                                  f"give {meaning}")

    @property
    def active(self) -> bool:
        """Whether any step changes images; an inactive Augment returns its input as it is."""
        return (self.hflip > 0 or self.vflip > 0 or self._geometry or self.brightness > 0
                or self.contrast > 0 or self._sharpens)

    @property
    def _geometry(self) -> bool:
        return self.rotation > 0 or self.crop_scale < 1

    @property
    def _sharpens(self) -> bool:
        return self.sharpness != 1 and self.sharpness_p > 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a float batch (N, C, H, W) on the 0..1 scale; the result stays in [0, 1].

        `generator` is a CPU generator: it makes every draw, so a seed fixes the result on any
        device. `x` itself is not modified.
        """
        if not self.active:
            return x
        n, _, height, width = x.shape

        def draw(*shape: int) -> torch.Tensor:  # float32 uniform in [0, 1), on x's device
            return to_device(torch.rand(shape, generator=generator), x.device)

        if self.hflip > 0:
            x = torch.where((draw(n) < self.hflip).view(-1, 1, 1, 1), x.flip(-1), x)
        if self.vflip > 0:
            x = torch.where((draw(n) < self.vflip).view(-1, 1, 1, 1), x.flip(-2), x)
        if self._geometry:
            angle, size, centre = self._draw_geometry(n, height, width, generator)
            x = warp(x, angle, size, centre)
        if self.brightness > 0:
            factor = _factors(draw(n), self.brightness).to(x.dtype).view(-1, 1, 1, 1)
            x = (x * factor).clamp_(0, 1)
        if self.contrast > 0:
            x = adjust_contrast(x, _factors(draw(n), self.contrast).to(x.dtype))
        if self._sharpens:
            chosen = (draw(n) < self.sharpness_p).view(-1, 1, 1, 1)
            x = torch.where(chosen, adjust_sharpness(x, self.sharpness), x)
        return x

    def _draw_geometry(self, n: int, height: int, width: int, generator: torch.Generator,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image: the angle (degrees), the crop's (width, height) as fractions of the image's,
        and its centre in grid_sample's coordinates (-1..1). All on the CPU."""
        angle = torch.zeros(n)
        if self.rotation > 0:
            angle = (torch.rand(n, generator=generator) * 2 - 1) * self.rotation
        size, centre = torch.ones(n, 2), torch.zeros(n, 2)
        if self.crop_scale < 1:
            size, centre = crop_boxes(n, self.crop_scale, height, width, generator)
        return angle, size, centre


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`, without making the host wait for the GPU.

    A plain copy from pageable memory synchronises the stream, so the host would stop queuing
    work each batch until the previous step finished; from pinned memory the copy is queued.
    """
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _factors(u: torch.Tensor, jitter: float) -> torch.Tensor:
    """ColorJitter's factors: `u` uniform in [0, 1) mapped onto [max(0, 1 - jitter), 1 + jitter]."""
    low = max(0.0, 1.0 - jitter)
    return low + u * (1.0 + jitter - low)


def crop_boxes(n: int, scale: float, height: int, width: int, generator: torch.Generator,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """RandomResizedCrop's boxes for `n` images of height x width pixels, drawn at once.

    Returns each box's (width, height) as fractions of the image's and its centre in -1..1
    coordinates. Like torchvision, each image tries CROP_TRIES boxes and keeps the first that
    fits inside the image; if none fits, it takes the central box of the nearest allowed ratio.
    Every image draws the same amount whatever fits, so the generator's state stays predictable.
    """
    area = scale + torch.rand(n, CROP_TRIES, generator=generator) * (1 - scale)
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(low + torch.rand(n, CROP_TRIES, generator=generator) * (high - low))
    place = torch.rand(n, 2, generator=generator)
    # in pixels, width = sqrt(area * H * W * ratio); as a fraction of the image's width:
    w = torch.sqrt(area * ratio * height / width)
    h = torch.sqrt(area / ratio * width / height)
    fits = (w <= 1) & (h <= 1)
    first = fits.int().argmax(dim=1, keepdim=True)  # the first box that fits (0 if none does)
    size = torch.cat([w.gather(1, first), h.gather(1, first)], dim=1)
    image_ratio = width / height
    fallback = (1.0, 1.0)  # the whole image, when its own ratio is allowed
    if image_ratio < CROP_RATIO[0]:
        fallback = (1.0, image_ratio / CROP_RATIO[0])
    elif image_ratio > CROP_RATIO[1]:
        fallback = (CROP_RATIO[1] / image_ratio, 1.0)
    found = fits.any(dim=1, keepdim=True)
    size = torch.where(found, size, torch.tensor(fallback))
    centre = (place * 2 - 1) * (1 - size)  # the box lies inside the image, uniformly placed
    return size, torch.where(found, centre, 0.0)


def warp(x: torch.Tensor, angle: torch.Tensor, size: torch.Tensor, centre: torch.Tensor,
         ) -> torch.Tensor:
    """Crop each image, resize the crop to the full size and rotate it: one bilinear resampling.

    `angle` (N,): degrees counter-clockwise, about the centre. `size` (N, 2): the crop's width
    and height as fractions of the image's. `centre` (N, 2): the crop's centre, -1..1 from left
    to right and top to bottom (grid_sample's coordinates, align_corners=False). Tensors may be
    on the CPU; they move to x's device. A sample point inside the image never reads the zero
    padding (it is clamped to the outermost pixel centres, as resizing a crop does); points
    outside the image read zero, which fills the corners a rotation uncovers.
    """
    n, _, height, width = x.shape
    radians = torch.deg2rad(angle.double())
    cos, sin = torch.cos(radians), torch.sin(radians)
    aspect = width / height  # rotation is in pixels; -1..1 coordinates stretch x and y unequally
    # output point -> point in the crop's frame (inverse rotation), then -> point in the image
    rotate = torch.stack([torch.stack([cos, -sin / aspect], -1),
                          torch.stack([sin * aspect, cos], -1)], -2)  # (N, 2, 2)
    theta = torch.cat([size.double().unsqueeze(-1) * rotate, centre.double().unsqueeze(-1)], -1)
    theta = to_device(theta.to(x.dtype), x.device)
    grid = F.affine_grid(theta, [n, x.shape[1], height, width], align_corners=False)
    edge = to_device(torch.tensor([1 - 1 / width, 1 - 1 / height], dtype=x.dtype), x.device)
    inside = (grid.abs() <= 1).all(dim=-1, keepdim=True)
    grid = torch.where(inside, torch.minimum(torch.maximum(grid, -edge), edge), grid)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp_(0, 1)  # bilinear weights sum to at most 1; clamp rounding only


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend each image with its mean grey level by its `factor` (N,), as torchvision does."""
    if x.shape[1] == 3:
        weights = to_device(torch.tensor(GREY_WEIGHTS, dtype=x.dtype), x.device).view(1, 3, 1, 1)
        grey = (x * weights).sum(dim=1, keepdim=True)
    else:
        grey = x
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    factor = factor.view(-1, 1, 1, 1)
    return (x * factor + mean * (1 - factor)).clamp_(0, 1)


def adjust_sharpness(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend every image with its smoothed copy, as torchvision does: 0 blurs, 1 keeps, 2 sharpens.

    The one-pixel border is kept, since the 3x3 kernel has no full neighbourhood there; images
    smaller than 3x3 are returned as they are.
    """
    channels, height, width = x.shape[1:]
    if height < 3 or width < 3:
        return x
    kernel = to_device(torch.tensor(SMOOTH_KERNEL, dtype=x.dtype), x.device)
    kernel = (kernel / kernel.sum()).expand(channels, 1, 3, 3)
    smooth = F.conv2d(x, kernel, groups=channels)
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    inner.copy_(smooth + factor * (inner - smooth))
    return out.clamp_(0, 1)
