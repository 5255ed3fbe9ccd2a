"""Grad-CAM, penultimate features, t-SNE map and overlays: on a tiny CNN trained here to find a
bright square, and on every registered architecture at a small size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from imgcls.errors import ConfigError, DataError
from imgcls.explain import (
    cam_layer,
    compute_grad_cam,
    overlay,
    penultimate_features,
    save_overlays,
    tsne_embedding,
    tsne_plot,
)
from imgcls.models import MODELS, SimpleCNN, build_model, head_module

SIZE = 32  # px: the CNN's last feature map is 8x8, fine enough to place a heatmap
SQUARE = 6  # px side of the bright square


def square_images(n: int, rng: np.random.Generator) -> tuple[Tensor, Tensor, np.ndarray]:
    """Grey noise images; class 1 has a bright square somewhere in the left half, class 0 none.

    Returns normalized images (N, 1, S, S), labels, and each square's mask (N, S, S) (where it
    is or, for class 0, would be).
    """
    x = rng.integers(0, 60, (n, 1, SIZE, SIZE)).astype(np.float32)
    y = np.arange(n) % 2
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        row = rng.integers(0, SIZE - SQUARE + 1)
        col = rng.integers(0, SIZE // 2 - SQUARE + 1)
        masks[i, row:row + SQUARE, col:col + SQUARE] = True
        if y[i]:
            x[i, 0][masks[i]] = 230
    return torch.from_numpy((x / 255 - 0.2) / 0.3), torch.from_numpy(y), masks


@pytest.fixture(scope="module")
def square_model() -> nn.Module:
    """A simplecnn, 8 channels wide to train fast (same layers as the registered 32), trained
    for 30 steps to tell images with the square from images without."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SimpleCNN(1, 2, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        x, y, _ = square_images(32, rng)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def square_test() -> tuple[Tensor, Tensor, np.ndarray]:
    return square_images(32, np.random.default_rng(1))


def test_grad_cam_finds_the_square_the_prediction_depends_on(square_model, square_test):
    x, y, masks = square_test
    with torch.no_grad():
        assert (square_model(x).argmax(1) == y).float().mean() >= 0.95  # it learnt the task
    heat = compute_grad_cam(square_model, "simplecnn", x).heatmaps
    with_square = y.numpy() == 1
    for h, mask in zip(heat[with_square], masks[with_square], strict=True):
        # the square (3.5% of the image) is at least 3x hotter than the image on average
        assert h[mask].mean() > 3 * h.mean()
        row, col = np.unravel_index(h.argmax(), h.shape)
        rows, cols = np.nonzero(mask)
        assert rows.min() - 3 <= row <= rows.max() + 3  # the peak is on or next to it
        assert cols.min() - 3 <= col <= cols.max() + 3
    # the left half, where squares are, holds most of the heatmaps (a square at the midline
    # spills into the right half)
    left = heat[with_square][:, :, :SIZE // 2].sum((1, 2)) / heat[with_square].sum((1, 2))
    assert left.mean() > 0.7


def test_grad_cam_shapes_ranges_and_targets(square_model, square_test):
    x, _, _ = square_test
    result = compute_grad_cam(square_model, "simplecnn", x, batch_size=5)  # several chunks
    assert result.heatmaps.shape == (32, SIZE, SIZE)
    assert result.heatmaps.dtype == np.float32
    assert result.heatmaps.min() >= 0 and result.heatmaps.max() <= 1
    peaks = result.heatmaps.reshape(32, -1).max(axis=1)
    assert np.all((peaks == 0) | np.isclose(peaks, 1))  # each map scaled to its own peak
    with torch.no_grad():
        probs = square_model(x).softmax(1).numpy()
    np.testing.assert_allclose(result.probabilities, probs, atol=1e-5)
    np.testing.assert_array_equal(result.targets, probs.argmax(1))
    # None explains the predicted class; an explicit target is used as given
    given = compute_grad_cam(square_model, "simplecnn", x,
                             target=torch.from_numpy(probs.argmax(1))).heatmaps
    np.testing.assert_allclose(given, result.heatmaps, atol=1e-6)
    other = compute_grad_cam(square_model, "simplecnn", x, target=1)
    np.testing.assert_array_equal(other.targets, np.ones(32))
    with pytest.raises(ConfigError, match=r"target class 2 does not exist; .* classes 0..1"):
        compute_grad_cam(square_model, "simplecnn", x, target=2)


def test_grad_cam_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = build_model("simplecnn", 3, in_channels=3)
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    compute_grad_cam(model, "simplecnn", x)
    penultimate_features(model, "simplecnn", x)
    assert model.training  # mode restored
    for key, value in model.state_dict().items():  # BatchNorm statistics untouched: eval mode
        assert torch.equal(value, state[key]), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._backward_hooks
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_grad_cam_on_a_frozen_model_under_no_grad():
    torch.manual_seed(0)
    model = build_model("simplecnn", 2, in_channels=3, freeze=True).eval()
    flags = [p.requires_grad for p in model.parameters()]
    assert not all(flags)  # the backbone is frozen
    with torch.inference_mode():
        x = torch.randn(3, 3, 16, 16)
        heat = compute_grad_cam(model, "simplecnn", x).heatmaps
    assert heat.shape == (3, 16, 16)
    assert np.isclose(heat.max(), 1)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


BIG = {"resnet101", "vgg11_bn", "vgg16_bn"}  # a second or more each to build on CPU
CNNS = [pytest.param(name, marks=pytest.mark.slow) if name in BIG else name
        for name in MODELS.names() if MODELS.get(name).cam_layer is not None]


@pytest.mark.parametrize("arch", CNNS)
def test_grad_cam_on_every_cnn_uses_its_last_feature_map(arch: str):
    size = max(64, MODELS.get(arch).min_image_size)
    torch.manual_seed(0)
    model = build_model(arch, 2, in_channels=1, image_size=size).eval()
    target = model.get_submodule(cam_layer(arch))
    # run order of every convolution and of the target layer, with their output shapes
    order: list[tuple[str, tuple[int, ...]]] = []
    handles = [module.register_forward_hook(
        lambda m, i, o, kind=("target" if module is target else "conv"):
        order.append((kind, tuple(o.shape))))
        for module in model.modules() if module is target or isinstance(module, nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(1, 1, size, size))
    for handle in handles:
        handle.remove()
    kinds = [kind for kind, _ in order]
    last_conv = max(i for i, kind in enumerate(kinds) if kind == "conv")
    assert kinds.index("target") > last_conv  # no convolution runs after the target
    target_shape = order[kinds.index("target")][1]
    assert len(target_shape) == 4 and target_shape[2:] == order[last_conv][1][2:]

    heat = compute_grad_cam(model, arch, torch.randn(2, 1, size, size)).heatmaps
    assert heat.shape == (2, size, size)
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


def test_vision_transformer_is_refused_but_gives_features():
    model = build_model("vit_b_16", 2, in_channels=3, image_size=32).eval()
    x = torch.randn(5, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"Grad-CAM needs a convolutional network.*vit_b_16"):
        compute_grad_cam(model, "vit_b_16", x)
    assert penultimate_features(model, "vit_b_16", x).shape == (5, 768)
    with pytest.raises(ConfigError, match="unknown architecture 'resnet19'"):
        cam_layer("resnet19")


@pytest.mark.parametrize("arch", ["simplecnn", "resnet18", "mobilenet_v3_large",
                                  "convnext_tiny"])
def test_penultimate_features_are_what_the_last_linear_layer_reads(arch: str):
    torch.manual_seed(0)
    model = build_model(arch, 3, in_channels=3, dropout=0.5).eval()
    x = torch.randn(5, 3, 32, 32)
    features = penultimate_features(model, arch, x, batch_size=2)
    linear = head_module(model, arch)[-1]
    assert isinstance(linear, nn.Linear)
    assert features.shape == (5, linear.in_features) and features.dtype == np.float32
    with torch.no_grad():  # the head's linear layer turns them into the model's logits
        np.testing.assert_allclose(linear(torch.from_numpy(features)).numpy(),
                                   model(x).numpy(), rtol=1e-4, atol=1e-5)


def clusters(per_class: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian blobs in 16 dimensions, one per class."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(classes), per_class)
    centres = rng.normal(0, 10, (classes, 16))
    return centres[labels] + rng.normal(0, 0.5, (len(labels), 16)), labels


def test_tsne_embedding_keeps_neighbours_and_is_reproducible():
    features, labels = clusters(8, 3)
    points = tsne_embedding(features)
    assert points.shape == (24, 2)
    np.testing.assert_array_equal(points, tsne_embedding(features))  # fixed random_state
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert (labels[distances.argmin(1)] == labels).all()  # nearest neighbour: same cluster
    assert tsne_embedding(features[:5]).shape == (5, 2)  # perplexity adapted to 5 points
    with pytest.raises(DataError, match="at least 5 images, got 4"):
        tsne_embedding(features[:4])


def test_tsne_plot_has_one_scatter_per_class():
    features, labels = clusters(6, 3)
    fig = tsne_plot(features, labels, ["ants", "bees", "wasps", "flies"])
    (ax,) = fig.axes
    assert [len(c.get_offsets()) for c in ax.collections] == [6, 6, 6]  # flies: no images
    colours = {tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert len(colours) == 3
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["ants (6)", "bees (6)", "wasps (6)"]
    fig.draw_without_rendering()  # the legend sits beside the points, covering none of them
    legend, axes = legend.get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= axes.x1 and legend.x1 <= fig.bbox.x1


def test_overlay_blends_the_colormap_over_grey_and_rgb_images():
    grey = np.full((1, 8, 8), 128, np.uint8)
    heat = np.zeros((8, 8), np.float32)
    heat[:, 4:] = 1.0
    out = overlay(grey, heat)
    assert out.mode == "RGB" and out.size == (8, 8)
    pixels = np.asarray(out).astype(int)
    assert pixels[0, 7, 0] > pixels[0, 7, 2]  # hot: red over blue (jet)
    assert pixels[0, 0, 2] > pixels[0, 0, 0]  # cold: blue over red
    rgb = np.random.default_rng(0).integers(0, 256, (3, 8, 8)).astype(np.uint8)
    assert np.array_equal(np.asarray(overlay(rgb, heat, alpha=0.0)), rgb.transpose(1, 2, 0))
    # an original-size PIL image: the heatmap is stretched to it
    big = overlay(Image.new("L", (40, 24), 50), heat)
    assert big.size == (40, 24)
    big_pixels = np.asarray(big).astype(int)
    assert big_pixels[12, 39, 0] > big_pixels[12, 39, 2]
    assert big_pixels[12, 0, 2] > big_pixels[12, 0, 0]


def test_save_overlays_writes_one_png_per_image(tmp_path: Path):
    images = [np.zeros((1, 8, 8), np.uint8), Image.new("RGB", (20, 10)),
              np.zeros((3, 8, 8), np.uint8)]
    heat = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    probs = np.array([[0.9, 0.1], [0.25, 0.75], [0.4, 0.6]])
    names = ["scans/a 1.png", "001.jpg", "001.png"]
    paths = save_overlays(images, names, heat, probs, ["ants", "bees"], tmp_path / "out")
    assert [p.name for p in paths] == [
        "scans_a_1_ants_p0.90.png", "001_bees_p0.75.png", "001_bees_p0.60.png"]
    assert sorted((tmp_path / "out").iterdir()) == sorted(paths)
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            sizes.append(image.size)
    assert sizes == [(8, 8), (20, 10), (8, 8)]
    # the same name twice is written twice
    again = save_overlays(images[:1] * 2, ["x.png"] * 2, heat[:2], probs[[0, 0]],
                          ["ants", "bees"], tmp_path / "twice")
    assert [p.name for p in again] == ["x_ants_p0.90.png", "x_ants_p0.90-2.png"]
    with pytest.raises(ValueError, match="3 images, 2 names"):
        save_overlays(images, names[:2], heat, probs, ["ants", "bees"], tmp_path)
