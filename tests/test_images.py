"""Every image mode decodes to the values a user expects; placeholders are told from pictures."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data import decode, scale_to_uint8, to_array
from imgcls.data.sources import array_to_image


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Photo-like uint8 pixels: every value used, so no placeholder rule applies."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reopened(image: Image.Image, path: Path, **save: object) -> Image.Image:
    image.save(path, **save)
    return Image.open(path)


def test_a_grayscale_image_gives_three_equal_planes_or_one() -> None:
    pixels = noise((12, 12))
    rgb = to_array(Image.fromarray(pixels), 12, 3)
    assert rgb.shape == (3, 12, 12) and rgb.dtype == np.uint8
    assert (rgb[0] == pixels).all() and (rgb[1] == pixels).all() and (rgb[2] == pixels).all()
    assert (to_array(Image.fromarray(pixels), 12, 1)[0] == pixels).all()


def test_one_channel_from_colour_is_luminance() -> None:
    gray = to_array(Image.new("RGB", (4, 4), (255, 0, 0)), 4, 1)
    assert gray.shape == (1, 4, 4)
    assert abs(int(gray[0, 0, 0]) - round(0.299 * 255)) <= 1  # ITU-R 601 weight of red


@pytest.mark.parametrize(("alpha", "red"), [(255, 255), (0, 0), (128, 128)])
def test_transparency_is_flattened_onto_black(alpha: int, red: int) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, alpha))
    out = to_array(rgba, 4, 3)
    assert abs(int(out[0, 0, 0]) - red) <= 1 and (out[1:] == 0).all()
    la = Image.new("LA", (4, 4), (200, alpha))
    assert abs(int(to_array(la, 4, 1)[0, 0, 0]) - round(200 * alpha / 255)) <= 1


def test_palette_images_with_and_without_transparency(tmp_path: Path) -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert tuple(to_array(palette, 4, 3)[:, 0, 0]) == (10, 200, 30)
    palette.putpixel((0, 0), 0)
    gif = reopened(palette, tmp_path / "p.gif", transparency=1)  # colour 1 is transparent
    assert gif.mode == "P" and "transparency" in gif.info
    out = to_array(gif, 4, 3)
    assert (out[:, 1, 1] == 0).all()  # the transparent green is black, not green


def test_bilevel_images_are_black_and_white(tmp_path: Path) -> None:
    bits = Image.fromarray(np.eye(8, dtype=bool))
    image = reopened(bits, tmp_path / "b.png")
    assert image.mode == "1"
    out = to_array(image, 8, 1)[0]
    assert (out == np.where(np.eye(8, dtype=bool), 255, 0)).all()


def test_twelve_bit_png_is_scaled_by_its_bit_depth(tmp_path: Path) -> None:
    pixels = np.array([[0, 4095], [2048, 1024]], dtype=np.uint16)  # a 12-bit scanner's range
    image = reopened(Image.fromarray(pixels), tmp_path / "x.png")
    assert image.mode == "I;16"
    out = to_array(image, 2, 1)[0]
    assert out[0, 1] == 255 and out[0, 0] == 0
    assert abs(int(out[1, 0]) - 128) <= 1 and abs(int(out[1, 1]) - 64) <= 1


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_sixteen_bit_tiff_is_divided_by_about_257(tmp_path: Path, dtype: str) -> None:
    pixels = np.array([[0, 65535], [257 * 100, 40000]]).astype(dtype)
    image = reopened(Image.fromarray(pixels), tmp_path / "x.tif")
    assert image.mode in ("I;16", "I;16B")
    out = to_array(image, 2, 1)[0]
    assert out.tolist() == [[0, 255], [100, round(40000 / 257)]]


def test_a_dark_sixteen_bit_image_stays_dark() -> None:
    # 300 needs 9 bits: scaled as 9-bit data, not stretched to white
    out = to_array(Image.fromarray(np.array([[0, 300]], dtype=np.int32)), 2, 1)[0]
    assert out[0, 1] == round(300 * 255 / 511)


def test_float_images_in_unit_range_and_beyond() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    assert unit.mode == "F"
    assert to_array(unit, 2, 1)[0].tolist() == [[0, 128], [255, 64]]
    wide = Image.fromarray(np.array([[-1.0, 1.0], [3.0, 1.0]], dtype=np.float32))
    assert to_array(wide, 2, 1)[0].tolist() == [[0, 128], [255, 128]]  # min-max


def test_scale_to_uint8_rules() -> None:
    assert scale_to_uint8(np.array([0, 255], np.int64)).tolist() == [0, 255]  # 8 bits: unchanged
    assert scale_to_uint8(np.array([0, 1023], np.uint16)).tolist() == [0, 255]  # 10 bits
    assert scale_to_uint8(np.array([-1000, 0, 1000], np.int16)).tolist() == [0, 128, 255]
    assert scale_to_uint8(np.array([np.nan, 1.0], np.float32)).tolist() == [0, 255]
    assert scale_to_uint8(np.array([True, False])).tolist() == [255, 0]


def test_cmyk_jpeg_keeps_its_colours(tmp_path: Path) -> None:
    colours = [(200, 30, 40), (20, 160, 220), (240, 230, 60)]
    rgb = np.zeros((48, 48, 3), np.uint8)
    for k, colour in enumerate(colours):
        rgb[16 * k:16 * (k + 1)] = colour
    path = tmp_path / "print.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    out = to_array(Image.open(path), 48, 3)
    for k, colour in enumerate(colours):
        assert np.abs(out[:, 16 * k + 8, 24].astype(int) - colour).max() <= 12
    # one channel is the luminance of those colours, also when libjpeg decodes at reduced scale
    gray = to_array(Image.open(path), 6, 1)[0]
    for k, (r, g, b) in enumerate(colours):
        assert abs(int(gray[2 * k + 1, 3]) - (0.299 * r + 0.587 * g + 0.114 * b)) <= 12


def test_jpeg_is_decoded_at_reduced_scale_with_the_same_content(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:256, 0:256]
    rgb = np.stack([xx, yy, 255 - xx], axis=-1).astype(np.uint8)  # smooth gradients
    path = tmp_path / "big.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    image = Image.open(path)
    small = to_array(image, 16, 3)
    assert image.size == (32, 32)  # libjpeg decoded at 1/8 scale, not 256x256
    full = Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    assert np.abs(small.astype(int) - np.asarray(full).transpose(2, 0, 1)).max() <= 12
    gray = to_array(Image.open(path), 16, 1)[0]  # drafted straight to luminance
    assert np.abs(gray.astype(int) - np.asarray(full.convert("L"))).max() <= 12


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_multi_frame_files_give_their_first_frame(tmp_path: Path, suffix: str) -> None:
    frames = [Image.new("L", (8, 8), value) for value in (40, 220, 90)]
    frames[0].save(tmp_path / f"stack{suffix}", save_all=True, append_images=frames[1:])
    image = Image.open(tmp_path / f"stack{suffix}")
    assert image.n_frames == 3
    image.seek(2)  # wherever a reader left it
    out = to_array(image, 8, 1)
    assert abs(int(out.mean()) - 40) <= 1


def test_array_pixels_become_images_that_keep_their_values() -> None:
    assert array_to_image(noise((4, 4))).mode == "L"
    assert array_to_image(noise((4, 4, 1))).mode == "L"
    assert array_to_image(noise((4, 4, 3))).mode == "RGB"
    assert array_to_image(noise((4, 4, 4))).mode == "RGBA"
    assert array_to_image(np.full((2, 2), 4095, np.uint16)).mode == "I"
    assert array_to_image(np.zeros((2, 2), np.float64)).mode == "F"
    rgb16 = array_to_image(np.full((2, 2, 3), 65535, np.uint16))  # PIL has no 16-bit RGB
    assert rgb16.mode == "RGB" and np.asarray(rgb16).min() == 255


# --- placeholders -----------------------------------------------------------------------------

def reason(image: Image.Image, min_side: int = 16) -> str | None:
    return decode(image, 16, 3, min_side)[1]


def test_photos_and_gray_scans_are_not_placeholders() -> None:
    assert reason(Image.fromarray(noise((40, 30, 3)))) is None
    # grayscale with few levels (a bilevel scan, a 16-level image) is still a picture
    levels = (noise((40, 40)) // 16 * 16).astype(np.uint8)
    assert reason(Image.fromarray(levels)) is None
    assert reason(Image.fromarray(noise((40, 40)) > 128)) is None  # mode 1


def test_a_tiny_image_is_a_placeholder() -> None:
    assert reason(Image.fromarray(noise((40, 12, 3)))) == (
        "placeholder: 12x40 px, under 16 px a side")
    assert reason(Image.fromarray(noise((40, 12, 3))), min_side=12) is None


def test_a_uniform_image_is_a_placeholder() -> None:
    flat = np.full((32, 32), 200, np.uint8)
    flat[0, 0] = 190  # one odd pixel does not make a picture
    why = reason(Image.fromarray(flat))
    assert why is not None and why.startswith("placeholder: uniform, luminance std 0.")


def test_a_colour_image_with_few_colours_is_a_placeholder() -> None:
    # a "not found" graphic: gray text on a light background, drawn with 33 colours
    rng = np.random.default_rng(1)
    shades = rng.integers(0, 256, (33, 3), dtype=np.uint8)
    pixels = shades[rng.integers(0, 33, (60, 60))]
    pixels[:33] = shades[np.arange(33) % 33][:, None]  # every colour used
    assert reason(Image.fromarray(pixels)) == "placeholder: 33 colours"
    palette = Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=33)
    assert reason(palette) == "placeholder: 33 colours"
    more = shades[rng.integers(0, 33, (60, 60))].astype(np.int16) + rng.integers(0, 3, (60, 60, 3))
    assert reason(Image.fromarray(more.clip(0, 255).astype(np.uint8))) is None  # > 64 colours
