import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from torch import Tensor, nn
from torchvision import models as tvm

from imgcls.errors import ConfigError
from imgcls.models import (
    BUILDERS,
    MODELS,
    build_model,
    check_image_size,
    freeze_backbone,
    head_module,
    smallest_image_size,
    weights_file,
)
from imgcls.profile import (
    count_flops,
    count_parameters,
    measure_architecture,
    profile_architecture,
    profile_model,
    reference_profile,
)

# Over 2 s to build: a freshly initialised 25088x4096 linear layer.
BIG = {"vgg11_bn", "vgg16_bn"}
PRETRAINED = [e.name for e in MODELS if e.obj.weights_url is not None]


def names(selected: list[str], slow: set[str] = BIG) -> list[object]:
    return [pytest.param(n, marks=pytest.mark.slow) if n in slow else n for n in selected]


smallest_size = smallest_image_size


@pytest.fixture(scope="module")
def rgb_model() -> Callable[[str], nn.Module]:
    """`name` for 5 classes, 3 channels, dropout 0.3 at its smallest size, built once per module
    (the big ones take seconds)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = build_model(name, 5, 3, 0.3, smallest_size(name)).eval()
        return cache[name]

    return get


@pytest.mark.parametrize("name", names(MODELS.names()))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_architecture_adapts_to_classes_and_channels(
        name: str, channels: int, rgb_model: Callable[[str], nn.Module]) -> None:
    size = smallest_size(name)
    model = (rgb_model(name) if channels == 3
             else build_model(name, 5, channels, 0.3, size).eval())
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 5)
    head = head_module(model, name)
    assert isinstance(head[0], nn.Dropout) and head[0].p == 0.3
    assert isinstance(head[1], nn.Linear) and head[1].out_features == 5
    # the searched rate replaces torchvision's classifier dropout (0.2 or 0.5) wherever it was
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} <= {0.0, 0.3}
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == channels
    assert profile_model(model, name, channels, size).flops > 0


@pytest.mark.parametrize("name", names(
    [e.name for e in MODELS if e.obj.min_image_size > 1 and e.obj.multiple_of == 1]))
def test_the_image_size_floor_is_real(name: str, rgb_model: Callable[[str], nn.Module]) -> None:
    # metadata is checked, not trusted: one pixel below the floor the network does break
    floor = MODELS.get(name).min_image_size
    with pytest.raises(RuntimeError):
        rgb_model(name)(torch.zeros(1, 3, floor - 1, floor - 1))
    with pytest.raises(ConfigError, match=rf"^{name} needs images of at least {floor}px \(.+\); "
                                          rf"the study uses {floor - 1}px$"):
        build_model(name, num_classes=2, image_size=floor - 1)


def test_a_vit_takes_only_multiples_of_its_patch() -> None:
    with pytest.raises(ConfigError, match=r"^vit_b_16 needs an image side that is a multiple of "
                                          r"16px \(.*patches.*\); the study uses 40px$"):
        check_image_size("vit_b_16", 40)
    with pytest.raises(AssertionError, match="indivisible by patch size"):
        tvm.vit_b_16(image_size=40)  # the rule is torchvision's own
    model = build_model("vit_b_16", 2, image_size=32).eval()
    assert model.encoder.pos_embedding.shape == (1, 2 * 2 + 1, 768)  # 2x2 patches + class token
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)


def test_vit_flops_count_attention(rgb_model: Callable[[str], nn.Module]) -> None:
    # multiply-accumulates of ViT-B/16 on one 16px image: 1 patch + the class token
    tokens, width, classes = 2, 768, 5
    layer = (tokens * width * 3 * width  # q, k, v projections
             + 2 * tokens * tokens * width  # scores and their weighted sum
             + tokens * width * width  # output projection
             + 2 * tokens * width * 4 * width)  # the MLP
    expected = 3 * 16 * 16 * width + 12 * layer + width * classes  # patches, layers, head
    assert profile_model(rgb_model("vit_b_16"), "vit_b_16", 3, 16).macs == expected


def test_resnet50_matches_its_published_size() -> None:
    profile = profile_architecture("resnet50", num_classes=2, in_channels=3, image_size=224)
    assert profile.params == 23_512_130  # the published figure for a 2-class ResNet-50
    # torchvision documents 4.09 GFLOPS (counted as multiply-accumulates) at 224x224
    assert abs(profile.macs / 1e9 - 4.09) < 0.01
    assert profile.flops == 2 * profile.macs


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETRAINED)
def test_sizes_match_torchvisions_metadata(name: str) -> None:
    weights = tvm.get_model_weights(name).DEFAULT
    assert MODELS.get(name).weights_url == weights.url
    profile = measure_architecture(name, num_classes=1000, in_channels=3, image_size=224)
    assert profile.params == weights.meta["num_params"]
    # torchvision's "GFLOPS" count multiply-accumulates, rounded to 3 decimals
    assert abs(profile.macs / 1e9 - weights.meta["_ops"]) <= 0.0005 + 1e-9


def test_every_architecture_of_the_catalog_has_a_builder() -> None:
    assert BUILDERS.names() == MODELS.names()


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize(("classes", "channels"), [(1000, 3), (2, 1), (7, 4)])
def test_the_catalogs_costs_are_what_a_built_model_counts(name: str, classes: int,
                                                          channels: int) -> None:
    # metadata is checked, not trusted: built (on the meta device, which the next test shows
    # counts as a real model does) and counted
    counted = measure_architecture(name, classes, channels, 224)
    assert reference_profile(name, classes, channels) == counted
    assert profile_architecture(name, classes, channels, 224) == counted


@pytest.mark.parametrize("name", ["simplecnn", "resnet18", "convnext_tiny", "vit_b_16"])
def test_a_model_built_on_the_meta_device_counts_as_a_real_one(name: str) -> None:
    size = max(smallest_size(name), 48)
    counted = profile_model(build_model(name, 3, 1, image_size=size), name, 1, size)
    assert measure_architecture(name, 3, 1, size) == counted


def test_flops_are_counted_not_estimated() -> None:
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    # 8x8 outputs x 4 channels x (3x3x1) multiply-accumulates, two FLOPs each
    assert count_flops(conv, (1, 1, 8, 8)) == 2 * 8 * 8 * 4 * 9
    assert count_parameters(conv) == 36


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet'.*known: .*resnet18"):
        build_model("resnet", num_classes=2)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_classes": 1}, "at least 2 classes, not 1"),
    ({"in_channels": 0}, "in_channels must be at least 1, not 0"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\), not 1.0"),
])
def test_impossible_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_model("simplecnn", **{"num_classes": 2, **kwargs})  # type: ignore[arg-type]


# --- pretrained weights from local files -------------------------------------------------------

def expected_filename(name: str) -> str:
    return Path(urlsplit(tvm.get_model_weights(name).DEFAULT.url).path).name


def save_imagenet_weights(name: str, folder: Path, seed: int = 0) -> dict[str, Tensor]:
    """A seeded, unmodified torchvision `name` (1000 classes) saved as its ImageNet file."""
    torch.manual_seed(seed)
    state = tvm.get_model(name, weights=None).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / expected_filename(name))
    return state


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """torch hub's checkpoint folder, under tmp_path."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints"


@pytest.mark.parametrize("name", PRETRAINED)
def test_the_weights_file_is_found_in_the_hub_cache(name: str, hub: Path) -> None:
    hub.mkdir(parents=True)
    (hub / expected_filename(name)).touch()
    assert weights_file(name) == hub / expected_filename(name)


def test_pretrained_backbone_holds_the_saved_weights(hub: Path) -> None:
    saved = save_imagenet_weights("resnet18", hub)
    model = build_model("resnet18", 3, pretrained=True)
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    assert set(state) == set(backbone) | {"fc.1.weight", "fc.1.bias"}
    assert state["fc.1.weight"].shape == (3, 512)  # a fresh head for the study's classes


def test_a_grey_first_conv_is_the_sum_over_rgb(hub: Path) -> None:
    saved = save_imagenet_weights("resnet18", hub)
    grey = build_model("resnet18", 2, in_channels=1, pretrained=True).eval()
    rgb = build_model("resnet18", 2, in_channels=3, pretrained=True).eval()
    assert torch.allclose(grey.conv1.weight, saved["conv1.weight"].sum(dim=1, keepdim=True))
    grey.fc = rgb.fc = nn.Identity()  # compare the features
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey(image), rgb(image.expand(-1, 3, -1, -1)), atol=1e-5)


def test_weights_dir_comes_before_the_hub_cache(hub: Path, tmp_path: Path) -> None:
    save_imagenet_weights("resnet18", hub, seed=0)
    mine = save_imagenet_weights("resnet18", tmp_path / "weights", seed=1)
    assert weights_file("resnet18", tmp_path / "weights").parent == tmp_path / "weights"
    model = build_model("resnet18", 2, pretrained=True, weights_dir=tmp_path / "weights")
    assert torch.equal(model.layer1[0].conv1.weight, mine["layer1.0.conv1.weight"])


def test_missing_weights_say_which_file_where_and_how_to_get_it(hub: Path,
                                                                tmp_path: Path) -> None:
    filename = expected_filename("resnet18")
    with pytest.raises(ConfigError) as caught:
        build_model("resnet18", 2, pretrained=True, weights_dir=tmp_path / "weights")
    message = str(caught.value)
    assert "\n" not in message
    assert filename in message
    assert str(tmp_path / "weights") in message and str(hub) in message
    assert tvm.ResNet18_Weights.DEFAULT.url in message


def test_simplecnn_has_no_pretrained_weights() -> None:
    with pytest.raises(ConfigError, match="simplecnn has no pretrained weights"):
        build_model("simplecnn", 2, pretrained=True)


def test_pretrained_takes_grey_or_rgb_only(hub: Path) -> None:
    save_imagenet_weights("resnet18", hub)
    with pytest.raises(ConfigError, match=r"takes 1 .* or 3 .* input channels, not 2"):
        build_model("resnet18", 2, in_channels=2, pretrained=True)


def _wrong_shape(folder: Path) -> None:
    torch.manual_seed(0)
    state = tvm.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(state, folder / expected_filename("resnet18"))


@pytest.mark.parametrize(("write", "problem"), [
    (lambda f: (f / expected_filename("resnet18")).write_bytes(b"<html>not found</html>"),
     "is not a readable PyTorch checkpoint"),
    (lambda f: torch.save(torch.zeros(3), f / expected_filename("resnet18")),
     "is not a state dict"),
    (lambda f: torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)},
                          f / expected_filename("resnet18")),
     r"does not hold resnet18's ImageNet weights \(\d+ missing tensors, e.g. 'bn1.weight'\)"),
    (_wrong_shape, r"'conv1.weight' is \(64, 1, 7, 7\), not \(64, 3, 7, 7\)"),
])
def test_a_file_that_is_not_the_weights_is_named(
        write: Callable[[Path], object], problem: str, hub: Path) -> None:
    hub.mkdir(parents=True)
    write(hub)
    path = hub / expected_filename("resnet18")
    with pytest.raises(ConfigError, match=re.escape(str(path)) + ".*" + problem):
        build_model("resnet18", 2, pretrained=True)


def test_densenet_loads_torchvisions_old_layer_names(hub: Path) -> None:
    # torchvision's DenseNet file names layers 'norm.1', 'conv.2' where the module has 'norm1',
    # and predates BatchNorm's num_batches_tracked
    saved = save_imagenet_weights("densenet121", hub)
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v
           for k, v in saved.items() if not k.endswith("num_batches_tracked")}
    assert old.keys() != saved.keys()
    torch.save(old, hub / expected_filename("densenet121"))
    model = build_model("densenet121", 2, pretrained=True)
    key = "features.denseblock1.denselayer1.conv1.weight"
    assert torch.equal(model.state_dict()[key], saved[key])


@pytest.mark.slow
@pytest.mark.parametrize("name", PRETRAINED)
def test_every_architecture_loads_its_weights_file(name: str, hub: Path) -> None:
    saved = save_imagenet_weights(name, hub)
    size = max(smallest_size(name), 32)
    model = build_model(name, 2, in_channels=1, dropout=0.1, image_size=size,
                        pretrained=True).eval()
    assert model(torch.zeros(2, 1, size, size)).shape == (2, 2)
    head = MODELS.get(name).head
    first_conv = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert torch.allclose(model.get_submodule(first_conv).weight,
                          saved[f"{first_conv}.weight"].sum(dim=1, keepdim=True))
    checked = 0
    for key, value in model.state_dict().items():
        if key.startswith((f"{head}.", f"{first_conv}.")) or key == "encoder.pos_embedding":
            continue
        assert torch.equal(value, saved[key]), key
        checked += 1
    assert checked > len(saved) // 2


@pytest.mark.slow
def test_vit_weights_are_interpolated_to_the_image_size(hub: Path) -> None:
    saved = save_imagenet_weights("vit_b_16", hub)
    model = build_model("vit_b_16", 2, image_size=32, pretrained=True).eval()
    positions = model.encoder.pos_embedding
    assert positions.shape == (1, 5, 768)
    assert torch.equal(positions[:, 0], saved["encoder.pos_embedding"][:, 0])  # class token
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)
    at_224 = build_model("vit_b_16", 2, pretrained=True)
    assert torch.equal(at_224.encoder.pos_embedding, saved["encoder.pos_embedding"])


# --- frozen backbones --------------------------------------------------------------------------

def test_a_frozen_backbone_leaves_only_the_head_trainable(hub: Path) -> None:
    save_imagenet_weights("resnet18", hub)
    model = build_model("resnet18", 3, pretrained=True, freeze=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.1.weight", "fc.1.bias"}
    assert [id(p) for p in head_module(model, "resnet18").parameters()] == [
        id(p) for p in model.parameters() if p.requires_grad]
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["simplecnn", "vit_b_16", "mobilenet_v3_large"])
def test_freezing_works_without_pretrained_weights(name: str) -> None:
    model = build_model(name, 2, image_size=smallest_size(name))
    freeze_backbone(model, name)
    head = MODELS.get(name).head
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{head}.1.weight", f"{head}.1.bias"]
