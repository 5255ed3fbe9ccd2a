import math
from dataclasses import fields, replace

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from imgcls.data.augment import (
    CROP_RATIO,
    Augment,
    adjust_contrast,
    adjust_sharpness,
    crop_boxes,
    warp,
)
from imgcls.errors import ConfigError

EVERYTHING = Augment(hflip=0.5, vflip=0.5, rotation=30, crop_scale=0.3, brightness=0.4,
                     contrast=0.4, sharpness=2.0, sharpness_p=0.5)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noise(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=gen(seed))


def no_geometry(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """warp's arguments that neither rotate nor crop: angle 0, the whole image, centred."""
    return torch.zeros(n), torch.ones(n, 2), torch.zeros(n, 2)


def test_defaults_change_nothing_and_draw_nothing() -> None:
    x, g = noise(4, 3, 8, 8), gen()
    state = g.get_state()
    assert not Augment().active
    assert not Augment(sharpness=2.0, sharpness_p=0.0).active  # never applied: off
    assert Augment()(x, g) is x
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("name,value", [("hflip", 0.1), ("vflip", 0.1), ("rotation", 5.0),
                                        ("crop_scale", 0.9), ("brightness", 0.1),
                                        ("contrast", 0.1), ("sharpness", 0.0)])
def test_each_step_alone_makes_it_active(name: str, value: float) -> None:
    assert replace(Augment(), **{name: value}).active


@pytest.mark.parametrize("name,value", [("hflip", 1.5), ("vflip", -0.1), ("rotation", 181.0),
                                        ("crop_scale", 0.0), ("crop_scale", 1.2),
                                        ("brightness", -1.0), ("contrast", math.nan),
                                        ("sharpness", -0.5), ("sharpness_p", 2.0),
                                        ("hflip", "0.5")])
def test_out_of_range_values_raise_one_line_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"augmentation {name}=") as error:
        Augment(**{name: value})  # type: ignore[arg-type]
    assert "\n" not in str(error.value) and "give " in str(error.value)


def test_every_field_has_a_validated_range() -> None:
    for item in fields(Augment):
        with pytest.raises(ConfigError, match=item.name):
            Augment(**{item.name: -1.0})


def test_horizontal_flip_mirrors_every_image_left_right() -> None:
    x = noise(3, 1, 4, 5)
    x[..., 0] = 0  # the left column is black: a flip moves it right
    flipped = Augment(hflip=1.0)(x, gen())
    assert torch.equal(flipped, x.flip(-1)) and (flipped[..., -1] == 0).all()


def test_vertical_flip_moves_the_top_row_to_the_bottom() -> None:
    x = noise(3, 3, 4, 5)
    x[..., 0, :] = 0
    flipped = Augment(vflip=1.0)(x, gen())
    assert (flipped[..., -1, :] == 0).all() and (flipped[..., 0, :] != 0).all()
    assert torch.equal(flipped, x.flip(-2))


def test_flips_are_drawn_per_image_with_their_probability() -> None:
    x = noise(400, 1, 2, 2)
    out = Augment(hflip=0.3)(x, gen())
    flipped = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.2 < flipped < 0.4


def test_rotation_by_90_degrees_equals_rot90() -> None:
    x = noise(2, 3, 6, 6)
    angle, size, centre = no_geometry(2)
    rotated = warp(x, angle + 90, size, centre)
    assert torch.allclose(rotated, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6)


@pytest.mark.parametrize("degrees", [30.0, -17.0])
def test_rotation_agrees_with_torchvision_rotate(degrees: float) -> None:
    x = torch.zeros(2, 3, 10, 14)  # not square; a black border: both fill beyond it with zeros
    x[..., 2:-2, 2:-2] = noise(2, 3, 6, 10)
    angle, size, centre = no_geometry(2)
    expected = TF.rotate(x, degrees, interpolation=TF.InterpolationMode.BILINEAR)
    assert torch.allclose(warp(x, angle + degrees, size, centre), expected, atol=1e-5)


def test_random_angles_stay_within_the_rotation_range() -> None:
    angle, size, centre = Augment(rotation=25.0)._draw_geometry(500, 8, 8, gen())
    assert angle.abs().max() <= 25 and angle.min() < -20 and angle.max() > 20
    assert torch.equal(size, torch.ones(500, 2)) and torch.equal(centre, torch.zeros(500, 2))


def test_the_whole_image_unrotated_is_the_identity() -> None:
    x = noise(2, 3, 7, 9)
    assert torch.allclose(warp(x, *no_geometry(2)), x, atol=1e-6)


@pytest.mark.parametrize("size,centre,box", [((0.5, 0.5), (-0.5, -0.5), (0, 0, 4, 6)),
                                             ((0.5, 0.75), (0.5, 0.0), (1, 6, 6, 6))])
def test_a_crop_agrees_with_torchvision_resized_crop(size: tuple[float, float],
                                                     centre: tuple[float, float],
                                                     box: tuple[int, int, int, int]) -> None:
    x = noise(2, 3, 8, 12)
    top, left, height, width = box
    out = warp(x, torch.zeros(2), torch.tensor([size] * 2), torch.tensor([centre] * 2))
    expected = TF.resized_crop(x, top, left, height, width, [8, 12], antialias=False)
    # Within a pixel of the box's edges inside the image, torchvision repeats the box's last
    # pixels while the continuous box reads its neighbours; everywhere else they agree.
    inner = (slice(None), slice(None),
             slice(1 if top else 0, -1 if top + height < 8 else None),
             slice(1 if left else 0, -1 if left + width < 12 else None))
    assert torch.allclose(out[inner], expected[inner], atol=1e-5)


def test_crop_boxes_keep_torchvision_area_and_ratio_ranges() -> None:
    height, width = 8, 12
    size, centre = crop_boxes(2000, 0.2, height, width, gen())
    area = size.prod(dim=1)
    ratio = size[:, 0] * width / (size[:, 1] * height)  # width / height in pixels
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1 + 1e-6 and area.min() < 0.25
    assert ratio.min() >= CROP_RATIO[0] - 1e-5 and ratio.max() <= CROP_RATIO[1] + 1e-5
    assert ((centre.abs() + size) <= 1 + 1e-6).all()  # every box lies inside the image


def test_crop_boxes_fall_back_to_the_central_box_when_none_fits() -> None:
    height, width = 8, 40  # ratio 5: a box of >= 90% of the area is never 4/3 or narrower
    size, centre = crop_boxes(50, 0.9, height, width, gen())
    expected = torch.tensor([CROP_RATIO[1] * height / width, 1.0])
    assert torch.allclose(size, expected.expand(50, 2)) and torch.equal(centre, torch.zeros(50, 2))


def test_brightness_factors_stay_in_colorjitter_range() -> None:
    x = torch.full((400, 1, 2, 2), 0.25)
    factor = Augment(brightness=0.5)(x, gen())[:, 0, 0, 0] / 0.25
    assert factor.min() >= 0.5 and factor.max() <= 1.5
    assert factor.min() < 0.55 and factor.max() > 1.45
    darkest = Augment(brightness=2.0)(x, gen())[:, 0, 0, 0] / 0.25  # 1 - 2 < 0: floor at 0
    assert darkest.min() >= 0 and darkest.min() < 0.1 and darkest.max() <= 3


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_keeps_each_images_mean_grey_and_agrees_with_torchvision(channels: int) -> None:
    x = 0.4 + 0.2 * noise(6, channels, 5, 5)  # mid-grey: no factor up to 1.5 clips it
    out = Augment(contrast=0.5)(x, gen())
    grey = (lambda t: t.mean(dim=(1, 2, 3))) if channels == 1 else (
        lambda t: TF.rgb_to_grayscale(t).mean(dim=(1, 2, 3)))
    # torchvision's luma weights sum to 0.9999, so the mean grey moves by at most 1e-4 of itself
    assert torch.allclose(grey(out), grey(x), atol=1e-4)
    assert not torch.allclose(out, x)
    factors = torch.tensor([0.0, 0.3, 1.0, 1.7, 2.5, 4.0])
    expected = torch.stack([TF.adjust_contrast(img, float(f))
                            for img, f in zip(x, factors, strict=True)])
    assert torch.allclose(adjust_contrast(x, factors), expected, atol=1e-6)


def test_sharpness_one_keeps_zero_blurs_and_agrees_with_torchvision() -> None:
    x = noise(3, 3, 6, 7)
    assert torch.equal(adjust_sharpness(x, 1.0), x)
    kernel = torch.tensor([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13
    blurred = x.clone()
    blurred[..., 1:-1, 1:-1] = F.conv2d(x.reshape(9, 1, 6, 7), kernel.view(1, 1, 3, 3)).view(
        3, 3, 4, 5)
    assert torch.allclose(adjust_sharpness(x, 0.0), blurred, atol=1e-6)
    for factor in (0.0, 0.5, 2.0):
        assert torch.allclose(adjust_sharpness(x, factor), TF.adjust_sharpness(x, factor),
                              atol=1e-6)
    always = Augment(sharpness=0.0, sharpness_p=1.0)(x, gen())
    assert torch.allclose(always, blurred, atol=1e-6)


def test_sharpness_is_applied_per_image_with_its_probability() -> None:
    x = noise(200, 1, 4, 4)
    out = Augment(sharpness=0.0, sharpness_p=0.5)(x, gen())
    changed = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.35 < changed < 0.65


@pytest.mark.parametrize("shape", [(1, 1, 9, 9), (5, 3, 8, 13), (3, 1, 2, 2)])
def test_everything_on_keeps_shape_dtype_and_the_unit_range(shape: tuple[int, ...]) -> None:
    x = noise(*shape)
    extreme = replace(EVERYTHING, brightness=3.0, contrast=3.0, sharpness=5.0, rotation=180.0)
    for augment in (EVERYTHING, extreme):
        out = augment(x, gen())
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1


def test_a_seed_fixes_every_draw_and_the_input_is_left_alone() -> None:
    x = noise(8, 3, 8, 8)
    before = x.clone()
    first = EVERYTHING(x, gen(3))
    assert torch.equal(first, EVERYTHING(x, gen(3)))
    assert not torch.allclose(first, EVERYTHING(x, gen(4)))
    assert torch.equal(x, before)


def test_steps_set_to_their_neutral_values_are_bit_identical_to_leaving_them_out() -> None:
    x = noise(8, 3, 8, 8)
    jitter = Augment(brightness=0.4)(x, gen())
    neutral = Augment(hflip=0.0, vflip=0.0, rotation=0.0, crop_scale=1.0, brightness=0.4,
                      contrast=0.0, sharpness=2.0, sharpness_p=0.0)
    assert torch.equal(neutral(x, gen()), jitter)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_same_augmentation_as_the_cpu() -> None:
    x = noise(16, 3, 12, 12)
    on_cpu = EVERYTHING(x, gen(5))
    on_cuda = EVERYTHING(x.cuda(), gen(5))
    assert on_cuda.is_cuda
    assert torch.allclose(on_cuda.cpu(), on_cpu, atol=1e-4)
