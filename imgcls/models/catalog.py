"""Architectures by name, described without building them.

Each entry says what the rest of the library needs to know of an architecture before any model
exists: the image sizes it takes and why, where its first convolution and its classifier head
are, the layer Grad-CAM explains, which torchvision ImageNet weights `pretrained=True` reads
(from a local file; imgcls.models.download fetches a missing one), and what it costs at the
reference input (1000 classes, one 224 px RGB image). The costs are measured, written down
here, and measured again by tests/test_models.py: metadata is checked, not trusted.

Importing this module imports no torch, so that a study is validated (an unknown architecture, a
size it cannot take, a missing weights file) and `imgcls-hpo models` lists the costs in a
fraction of a second. Building a model is `imgcls.models.build_model`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from imgcls.errors import ConfigError
from imgcls.registry import Registry

# The input the reference costs are measured at: torchvision's, for which it publishes them.
REFERENCE_CLASSES = 1000
REFERENCE_CHANNELS = 3
REFERENCE_SIZE = 224


@dataclass(frozen=True)
class Reference:
    """An architecture's size and cost at the reference input, as torch.utils.flop_counter
    counts it, with what varies with the classes and the input channels: the head's linear
    layer and the first convolution."""

    params: int  # every parameter, trainable or frozen
    flops: int  # one forward pass on one image
    head_features: int  # inputs of the classifier's linear layer
    stem_weights: int  # weights of the first convolution (its bias does not vary)
    stem_flops: int  # FLOPs of the first convolution


@dataclass(frozen=True)
class Architecture:
    name: str
    why: str  # the reason for the size limits, quoted when a size is refused
    min_image_size: int  # the smallest image side (px) the network's downsampling survives
    head: str  # dotted path of the classifier head (dropout + linear) in the built model
    first_conv: str  # dotted path of the first convolution, rebuilt for other input channels
    # The last convolutional feature map, which Grad-CAM weighs; None for a network without
    # one (a vision transformer)
    cam_layer: str | None
    reference: Reference
    multiple_of: int = 1  # the image side must be a multiple of it (a ViT's patch size)
    weights_url: str | None = None  # torchvision's ImageNet weights; None: no pretrained start

    @property
    def weights_filename(self) -> str | None:
        """The name torchvision downloads the weights as, e.g. resnet18-f37072fd.pth."""
        return Path(urlsplit(self.weights_url).path).name if self.weights_url else None


MODELS: Registry[Architecture] = Registry("architecture")


def check_image_size(name: str, image_size: int) -> None:
    """Raise ConfigError, with the reason, when `name` cannot take `image_size`px images."""
    arch = MODELS.get(name)
    if image_size < arch.min_image_size:
        need = f"images of at least {arch.min_image_size}px"
    elif image_size % arch.multiple_of:
        need = f"an image side that is a multiple of {arch.multiple_of}px"
    else:
        return
    raise ConfigError(f"{name} needs {need} ({arch.why}); the study uses {image_size}px")


def smallest_image_size(name: str) -> int:
    """The smallest side `name` takes: its floor, rounded up to its multiple."""
    arch = MODELS.get(name)
    return -(-arch.min_image_size // arch.multiple_of) * arch.multiple_of


# Where pretrained weights may come from. Offline (this variable set to 1, or `weights_dir` given:
# the user keeps the files), a missing file is an error naming it; else it is downloaded once
# into torch hub's cache, from torchvision's URL or from a mirror of download.pytorch.org/models.
OFFLINE_ENV = "IMGCLS_HPO_OFFLINE"
MIRROR_ENV = "IMGCLS_HPO_WEIGHTS_URL"


def find_weights(name: str, weights_dir: str | Path | None = None) -> Path | None:
    """The local file of `name`'s ImageNet weights, or None where it is not (yet): `weights_dir`
    first, then torch hub's cache (`torch.hub.get_dir()/checkpoints`, which honours
    $TORCH_HOME). The file name is the one torchvision downloads, e.g. resnet18-f37072fd.pth."""
    filename = pretrained_filename(name)
    for folder in _weights_folders(weights_dir):
        if (folder / filename).is_file():
            return folder / filename
    return None


def weights_file(name: str, weights_dir: str | Path | None = None) -> Path:
    """`find_weights`, or a ConfigError naming the file, the folders and the URL."""
    found = find_weights(name, weights_dir)
    if found is not None:
        return found
    folders = _weights_folders(weights_dir)
    where = " or ".join(str(folder) for folder in folders)
    raise ConfigError(f"pretrained {name} needs {pretrained_filename(name)}, not found in "
                      f"{where}; on a machine with internet download {weights_url(name)} and "
                      f"copy it into {folders[0]}")


def can_download(weights_dir: str | Path | None = None) -> bool:
    """Whether a missing weights file is fetched: not with `weights_dir` (the user's own
    folder) and not with $IMGCLS_HPO_OFFLINE set to anything but 0."""
    return weights_dir is None and os.environ.get(OFFLINE_ENV, "0") in ("", "0")


def weights_url(name: str) -> str:
    """Where `name`'s weights are fetched from: torchvision's URL, or its file under the mirror
    $IMGCLS_HPO_WEIGHTS_URL."""
    mirror = os.environ.get(MIRROR_ENV)
    filename = pretrained_filename(name)
    if mirror:
        return mirror.rstrip("/") + "/" + filename
    return str(MODELS.get(name).weights_url)


def hub_checkpoints() -> Path:
    """torch hub's folder of downloaded weights, where a download goes."""
    return _hub_dir() / "checkpoints"


def pretrained_filename(name: str) -> str:
    """The file name torchvision downloads `name`'s weights as; a ConfigError for an
    architecture without pretrained weights."""
    filename = MODELS.get(name).weights_filename
    if filename is None:
        raise ConfigError(f"{name} has no pretrained weights; train it from scratch "
                          f"(pretrained off) or pick a torchvision architecture")
    return filename


def _weights_folders(weights_dir: str | Path | None) -> list[Path]:
    folders = [Path(weights_dir).expanduser()] if weights_dir is not None else []
    return [*folders, hub_checkpoints()]


def _hub_dir() -> Path:
    """torch.hub.get_dir() without importing torch: $TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub. Where torch is loaded already, torch's
    own answer (which also knows a folder set by torch.hub.set_dir)."""
    import sys

    hub = sys.modules.get("torch.hub")
    if hub is not None:
        return Path(hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(home).expanduser() / "hub"


def _add(name: str, **fields: object) -> None:
    MODELS.add(name, Architecture(name=name, **fields))  # type: ignore[arg-type]


_TV = "https://download.pytorch.org/models/"
# Padded convolutions and adaptive average pooling: these take any size, down to 1px.
ANY_SIZE = "padded convolutions and adaptive pooling"
FIVE_POOLS = "five unpadded 2x max-pools"

_add("simplecnn", why="three unpadded 2x max-pools", min_image_size=8, head="head",
     # the last ReLU, before the last 2x max-pool
     first_conv="features.0", cam_layer="features.10",
     reference=Reference(params=222_472, flops=1_011_804_160,
                         head_features=128, stem_weights=864, stem_flops=86_704_128))
_add("resnet18", why=ANY_SIZE, min_image_size=1, head="fc", first_conv="conv1",
     cam_layer="layer4", weights_url=_TV + "resnet18-f37072fd.pth",
     reference=Reference(params=11_689_512, flops=3_628_146_688,
                         head_features=512, stem_weights=9_408, stem_flops=236_027_904))
_add("resnet34", why=ANY_SIZE, min_image_size=1, head="fc", first_conv="conv1",
     cam_layer="layer4", weights_url=_TV + "resnet34-b627a593.pth",
     reference=Reference(params=21_797_672, flops=7_327_522_816,
                         head_features=512, stem_weights=9_408, stem_flops=236_027_904))
_add("resnet50", why=ANY_SIZE, min_image_size=1, head="fc", first_conv="conv1",
     cam_layer="layer4", weights_url=_TV + "resnet50-11ad3fa6.pth",
     reference=Reference(params=25_557_032, flops=8_178_368_512,
                         head_features=2_048, stem_weights=9_408, stem_flops=236_027_904))
_add("resnet101", why=ANY_SIZE, min_image_size=1, head="fc", first_conv="conv1",
     cam_layer="layer4", weights_url=_TV + "resnet101-cd907fc2.pth",
     reference=Reference(params=44_549_160, flops=15_602_810_880,
                         head_features=2_048, stem_weights=9_408, stem_flops=236_027_904))
_add("vgg11_bn", why=FIVE_POOLS, min_image_size=32, head="classifier.5",
     first_conv="features.0", cam_layer="features.27",  # the last ReLU, before the last pool
     weights_url=_TV + "vgg11_bn-6002323d.pth",
     reference=Reference(params=132_868_840, flops=15_218_180_096,
                         head_features=4_096, stem_weights=1_728, stem_flops=173_408_256))
_add("vgg16_bn", why=FIVE_POOLS, min_image_size=32, head="classifier.5",
     first_conv="features.0", cam_layer="features.42",  # the last ReLU, before the last pool
     weights_url=_TV + "vgg16_bn-6c64b313.pth",
     reference=Reference(params=138_365_992, flops=30_940_528_640,
                         head_features=4_096, stem_weights=1_728, stem_flops=173_408_256))
# 29px: 15px after the stem, 8 after its max-pool, then 4, 2 and 1 after the transitions.
_add("densenet121", why="a stride-4 stem and three unpadded 2x average-pool transitions",
     min_image_size=29, head="classifier", first_conv="features.conv0", cam_layer="features",
     weights_url=_TV + "densenet121-a639ec97.pth",
     reference=Reference(params=7_978_856, flops=5_668_323_328,
                         head_features=1_024, stem_weights=9_408, stem_flops=236_027_904))
_add("efficientnet_b0", why=ANY_SIZE, min_image_size=1, head="classifier",
     first_conv="features.0.0", cam_layer="features",
     weights_url=_TV + "efficientnet_b0_rwightman-7f5810bc.pth",
     reference=Reference(params=5_288_548, flops=771_629_504,
                         head_features=1_280, stem_weights=864, stem_flops=21_676_032))
_add("mobilenet_v3_large", why=ANY_SIZE, min_image_size=1, head="classifier.2",
     first_conv="features.0.0", cam_layer="features",
     weights_url=_TV + "mobilenet_v3_large-5c1a4163.pth",
     reference=Reference(params=5_483_032, flops=433_179_520,
                         head_features=1_280, stem_weights=432, stem_flops=10_838_016))
_add("convnext_tiny", why="a stride-4 patchify stem and three unpadded 2x downsamplings",
     min_image_size=32, head="classifier.2", first_conv="features.0.0", cam_layer="features",
     weights_url=_TV + "convnext_tiny-983f1562.pth",
     reference=Reference(params=28_589_128, flops=8_911_062_528,
                         head_features=768, stem_weights=4_608, stem_flops=28_901_376))
_add("vit_b_16", why="its 16x16 patches must tile the image", min_image_size=16,
     multiple_of=16, head="heads", first_conv="conv_proj", cam_layer=None,
     weights_url=_TV + "vit_b_16-c867db91.pth",
     reference=Reference(params=86_567_656, flops=35_127_656_448,
                         head_features=768, stem_weights=589_824, stem_flops=231_211_008))
