"""What a trained classifier looks at: Grad-CAM heatmaps drawn over the images, and a t-SNE map of
the features its classifier head sees.

Every function takes a plain model built by `imgcls.models.build_model`, the architecture name it
was built as, and a normalized batch (N, C, H, W) as training saw it. They leave the model as they
found it: hooks are removed, the train/eval mode is restored, parameters' `requires_grad` and
`.grad` are never touched (Grad-CAM gets its graph from an input that requires grad, so a frozen
backbone works too).

Grad-CAM (Selvaraju et al., 2017): the gradient of a class score with respect to the last
convolutional feature map, averaged over its positions, weighs that map's channels; the weighted
sum, clipped at zero, is where the evidence for the class lies.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from imgcls.errors import ConfigError, DataError
from imgcls.models.builders import head_module
from imgcls.models.catalog import MODELS
from imgcls.uncertainty import Sampling, entropy_ranks, predictive_entropy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from imgcls.predict import Predictor

MIN_TSNE_IMAGES = 5  # below this a 2-D neighbourhood map shows nothing (and PCA init fails)
MAX_PERPLEXITY = 30.0  # scikit-learn's default, for larger sets


@dataclass(frozen=True)
class GradCam:
    """Grad-CAM of a batch, with the predictions of the same forward pass."""

    heatmaps: np.ndarray  # float32 (N, H, W) in [0, 1], at the input's size; 1 = the peak
    probabilities: np.ndarray  # float32 (N, K) softmax of the logits
    targets: np.ndarray  # int64 (N,) the class each heatmap explains


def cam_layer(arch: str) -> str:
    """The dotted path of the module whose output is `arch`'s last convolutional feature map
    (the catalog's `cam_layer`): it runs after every convolution and has the last convolution's
    resolution. Where a max-pool follows the last convolution (simplecnn, VGG), the map is taken
    before it: the pool halves the heatmap's resolution and adds no evidence.

    Raises ConfigError for an unknown architecture (listing the known ones) and for one that has
    no convolutional feature map (a vision transformer).
    """
    layer = MODELS.get(arch).cam_layer  # an unknown name raises, listing the registered ones
    if layer is None:
        cnns = ", ".join(a.name for a in (e.obj for e in MODELS) if a.cam_layer is not None)
        raise ConfigError(f"Grad-CAM needs a convolutional network and {arch} is a vision "
                          f"transformer; explain a model of a CNN architecture ({cnns})")
    return layer


def compute_grad_cam(model: nn.Module, arch: str, x: Tensor,
                     target: int | Sequence[int] | Tensor | None = None,
                     batch_size: int = 32) -> GradCam:
    """Grad-CAM of `x` (N, C, H, W), normalized, and the model's probabilities for it.

    Each heatmap is ReLU(sum_c w_c A_c) over the feature map A = `cam_layer(arch)`, with w_c the
    mean over positions of d(logit of the target class)/dA_c; it is upsampled bilinearly to
    (H, W) and divided by its maximum, so that 1 marks the strongest evidence in that image. A map
    with no positive evidence anywhere stays all zeros rather than stretching noise to [0, 1].

    The model runs in eval mode (BatchNorm statistics, no dropout), `batch_size` images at a time
    (the graph of a large network at full size is memory-hungry), on the device of its parameters.
    """
    layer = model.get_submodule(cam_layer(arch))
    device = _device(model)
    n = len(x)
    targets = _targets(target, n)
    heatmaps, probabilities, explained = [], [], []
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size].to(device)
        chosen = None if targets is None else targets[start:start + batch_size].to(device)
        maps, probs, chosen = _grad_cam_batch(model, layer, chunk, chosen)
        heatmaps.append(maps)
        probabilities.append(probs)
        explained.append(chosen)
    if not heatmaps:
        size = tuple(x.shape[-2:])
        return GradCam(np.zeros((0, *size), np.float32), np.zeros((0, 0), np.float32),
                       np.zeros(0, np.int64))
    return GradCam(np.concatenate(heatmaps), np.concatenate(probabilities),
                   np.concatenate(explained))


def _grad_cam_batch(model: nn.Module, layer: nn.Module, x: Tensor, targets: Tensor | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    captured: list[Tensor] = []

    def keep(module: nn.Module, inputs: object, output: Tensor) -> None:
        captured.append(output)

    handle = layer.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        # inference_mode(False) and enable_grad: a caller's no_grad/inference_mode would leave no
        # graph. The input, not the parameters, requires grad: a frozen model keeps its flags.
        with torch.inference_mode(False), torch.enable_grad():
            inputs = x.detach().clone().requires_grad_(True)
            logits = model(inputs)
            num_classes = logits.shape[1]
            if targets is None:
                targets = logits.argmax(dim=1)
            elif targets.min() < 0 or targets.max() >= num_classes:
                bad = targets[(targets < 0) | (targets >= num_classes)][0].item()
                raise ConfigError(f"Grad-CAM target class {bad} does not exist; the model has "
                                  f"classes 0..{num_classes - 1}")
            features = captured[-1]
            # Images are independent in eval mode, so the gradient of the summed scores holds
            # each image's own gradient.
            score = logits.gather(1, targets[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, features)
    finally:
        handle.remove()
        model.train(was_training)
    with torch.no_grad():
        weights = gradients.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * features).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        peak = cam.flatten(1).amax(dim=1)[:, None, None]
        cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), 0.0)
        cam = cam.clamp(0.0, 1.0)
        probs = logits.softmax(dim=1)
    return (cam.float().cpu().numpy(), probs.float().cpu().numpy(),
            targets.cpu().numpy().astype(np.int64))


def _targets(target: int | Sequence[int] | Tensor | None, n: int) -> Tensor | None:
    if target is None:
        return None
    if isinstance(target, int | np.integer):
        return torch.full((n,), int(target), dtype=torch.long)
    targets = torch.as_tensor(target, dtype=torch.long).flatten()
    if len(targets) != n:
        raise ValueError(f"{len(targets)} Grad-CAM targets for {n} images")
    return targets


def _device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def penultimate_features(model: nn.Module, arch: str, x: Tensor,
                         batch_size: int = 256) -> np.ndarray:
    """float32 (N, D): the input of the head's final linear layer for the normalized images `x`,
    i.e. the features the classifier separates (D = that layer's in_features).

    Runs in eval mode without a graph, `batch_size` images at a time.
    """
    linears = [m for m in head_module(model, arch).modules() if isinstance(m, nn.Linear)]
    captured: list[Tensor] = []

    def keep(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        captured.append(inputs[0].detach().flatten(1).float().cpu())

    handle = linears[-1].register_forward_pre_hook(keep)
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start:start + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        return np.zeros((0, linears[-1].in_features), np.float32)
    return torch.cat(captured).numpy()


def tsne_embedding(features: np.ndarray, random_state: int = 0) -> np.ndarray:
    """(N, 2) t-SNE coordinates of the (N, D) `features`.

    Perplexity (the effective number of neighbours each point keeps) is min(30, (N - 1) / 3):
    scikit-learn requires it below N, and a third of the set keeps some structure on small sets.
    Fixed `random_state`: the same features give the same map. Fewer than MIN_TSNE_IMAGES
    images raise DataError.
    """
    from sklearn.manifold import TSNE

    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    if n < MIN_TSNE_IMAGES:
        raise DataError(f"a t-SNE map needs at least {MIN_TSNE_IMAGES} images, got {n}; "
                        f"give more images")
    perplexity = min(MAX_PERPLEXITY, (n - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=random_state)
    return tsne.fit_transform(features.reshape(n, -1)).astype(np.float32)


def tsne_plot(features: np.ndarray, labels: Sequence[int] | np.ndarray, classes: Sequence[str],
              *, title: str = "t-SNE of penultimate features", random_state: int = 0) -> Figure:
    """A matplotlib Figure (no pyplot) of `tsne_embedding(features)`: one scatter per class
    present in `labels` (indices into `classes`), each its own colour, named in the legend with
    its image count."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(features):
        raise ValueError(f"{len(labels)} labels for {len(features)} feature rows")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must index the {len(classes)} classes, got {labels.min()}.."
                         f"{labels.max()}")
    points = tsne_embedding(features, random_state)
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    fig = Figure(figsize=(7.5, 5), layout="constrained")  # room for the legend beside
    ax = fig.subplots()
    for c, name in enumerate(classes):
        mine = labels == c
        if mine.any():
            ax.scatter(points[mine, 0], points[mine, 1], s=16, color=palette(c % palette.N),
                       label=f"{name} ({int(mine.sum())})")
    # t-SNE axes have no unit: only neighbourhoods mean something.
    ax.set(title=title, xticks=[], yticks=[])
    # outside the axes: a legend inside covered the points of whichever corner it chose
    fig.legend(title="class", loc="outside right upper", fontsize=8)
    return fig


def overlay(image: np.ndarray | Image.Image, heatmap: np.ndarray, alpha: float = 0.4,
            colormap: str = "jet") -> Image.Image:
    """`heatmap` (H, W) in [0, 1] as `colormap` colours blended over `image`, an RGB PIL image.

    image: uint8 (C, S, S) with C = 1 (grey) or 3 (as the cache holds it), or a PIL image of any
        size and mode; the heatmap is resized (bilinear) to it, so an original-size image gives
        a sharper picture than the network's input.
    alpha: the heatmap's weight, 0 = the image only, 1 = the heatmap only.
    """
    from matplotlib import colormaps

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], not {alpha}")
    base = _to_rgb(image)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"a heatmap is (H, W), not {heat.shape}")
    if heat.shape != (base.height, base.width):
        resized = Image.fromarray(heat, mode="F").resize(base.size, Image.Resampling.BILINEAR)
        heat = np.asarray(resized, dtype=np.float32)
    colours = colormaps[colormap](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * np.asarray(base, dtype=np.float32) + alpha * colours
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def _to_rgb(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[0] not in (1, 3):
        raise ValueError(f"an image array is uint8 (C, S, S) with C 1 or 3, not "
                         f"{array.dtype} {array.shape}")
    pixels = np.repeat(array, 3, axis=0) if array.shape[0] == 1 else array
    return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), mode="RGB")


def overlay_name(name: str, predicted: str, probability: float) -> str:
    """The file name of an image's overlay: its id without suffix (folders joined by '_'), the
    predicted class and its probability, e.g. 'scans_017_bees_p0.93.png'."""
    stem = str(PurePath(name).with_suffix("")).strip("/\\")
    return f"{_safe(stem)}_{_safe(predicted)}_p{probability:.2f}.png"


def caption(predicted: str, probability: float, entropy: float | None = None,
            rank: int | None = None, of: int | None = None) -> str:
    """What an overlay says of its image: the class explained and its probability, and with
    uncertainty asked for its predictive entropy and rank (1 = the least sure)."""
    text = f"{predicted}  p={probability:.2f}"
    if entropy is not None:
        text += f"  entropy {entropy:.2f} nats"
        if rank is not None:
            text += f", rank {rank}" + (f"/{of}" if of else "")
    return text


def captioned(image: Image.Image, text: str) -> Image.Image:
    """`image` with `text` on a black strip below it (the evidence stays uncovered)."""
    from PIL import ImageDraw, ImageFont

    size = max(10, min(24, image.width // 20))
    font = ImageFont.load_default(size=size)
    strip = size + size // 2 + 4
    out = Image.new("RGB", (image.width, image.height + strip), (0, 0, 0))
    out.paste(image.convert("RGB"), (0, 0))
    ImageDraw.Draw(out).text((4, image.height + 2), text, fill=(255, 255, 255), font=font)
    return out


def _safe(text: str) -> str:
    # Anything but letters, digits, '.', '-' and '_' (path separators, spaces) becomes '_'.
    return re.sub(r"[^\w.-]+", "_", text) or "_"


def save_overlays(images: Sequence[np.ndarray | Image.Image], names: Sequence[str],
                  heatmaps: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
                  out_dir: str | Path, alpha: float = 0.4,
                  captions: Sequence[str] | None = None) -> list[Path]:
    """Write one PNG per image into `out_dir` (made if missing): its heatmap over it, named by
    `overlay_name` after the image's name (an id or relative path), its predicted class (argmax
    of its `probabilities` row) and that probability, with its caption (if given) below it.
    Returns the paths, in input order.

    Two images whose names give the same file name (the same image twice) get '-2', '-3', ...
    before '.png' rather than overwriting each other.
    """
    n = len(images)
    if not len(names) == len(heatmaps) == len(probabilities) == n or (
            captions is not None and len(captions) != n):
        raise ValueError(f"{n} images, {len(names)} names, {len(heatmaps)} heatmaps and "
                         f"{len(probabilities)} probability rows: one of each per image")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output folder {out} ({exc.strerror}); choose "
                        f"another --out") from None
    paths: list[Path] = []
    used: set[str] = set()
    for image, name, heatmap, probs in zip(images, names, heatmaps, probabilities, strict=True):
        best = int(np.argmax(probs))
        filename = overlay_name(name, str(classes[best]), float(probs[best]))
        stem, k = filename.removesuffix(".png"), 2
        while filename in used:
            filename, k = f"{stem}-{k}.png", k + 1
        used.add(filename)
        path = out / filename
        picture = overlay(image, heatmap, alpha)
        if captions is not None:
            picture = captioned(picture, captions[len(paths)])
        picture.save(path)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class ExplainReport:
    written: list[Path]  # the overlays, then tsne.png with --embed
    unreadable: list[str]  # "path (reason)" of the files left out


def explain_files(predictor: Predictor, paths: Sequence[str | Path] | str | Path, out_dir: Path,
                  *, embed: bool = False, batch_size: int = 32,
                  sampling: Sampling | None = None) -> ExplainReport:
    """Grad-CAM overlays for every image file in `paths` (files, or folders searched
    recursively), written to `out_dir`, one PNG per image, captioned with the class explained
    and its probability; with `sampling` (MC-dropout, flip TTA) the class and probability are
    the mean over the samples, and the caption adds the image's predictive entropy and its rank
    among the images (1 = the least sure). With `embed`, also `tsne.png` of the images'
    penultimate features. Points are coloured by the image's folder when that folder is named
    after a class (labelled data), else by the predicted class. Unreadable files are listed in
    the report and left out; the others are explained."""
    from imgcls.predict import image_files

    predictor = predictor.explained  # an ensemble: its first member
    arch, classes = predictor.preprocessing.arch, predictor.classes
    cam_layer(arch)  # a ViT is refused before any image is read
    if sampling is not None:
        predictor.check_sampling(sampling)
    files, unreadable, decoded = image_files(paths), [], []
    readable: list[Path] = []
    for path in files:
        try:
            decoded.append(predictor.decode([path]))
            readable.append(path)
        except DataError as exc:
            unreadable.append(f"{path} ({exc})")
    if not readable:
        raise DataError(f"none of the {len(files)} files could be read as images")
    arrays = np.concatenate(decoded)
    x = predictor.normalized(arrays)
    sampled, doubt = None, [(None, None)] * len(readable)
    if sampling is not None:
        sampled = predictor.sampled_probabilities(arrays, sampling, batch_size)
        entropy = predictive_entropy(sampled)
        doubt = list(zip(entropy.tolist(), entropy_ranks(entropy).tolist(), strict=True))
    cam = compute_grad_cam(predictor.model, arch, x, batch_size=batch_size,
                           target=None if sampled is None else sampled.argmax(1).tolist())
    shown = cam.probabilities if sampled is None else sampled
    captions = [caption(str(classes[k]), float(row[k]), entropy, rank, len(readable))
                for row, k, (entropy, rank) in zip(shown, shown.argmax(1), doubt, strict=True)]
    originals = []
    for path in readable:
        with Image.open(path) as image:
            originals.append(_viewable(image.convert("RGB")))
    common = Path(os.path.commonpath([p.parent for p in readable]))
    written = save_overlays(originals, [str(p.relative_to(common)) for p in readable], cam.heatmaps,
                            shown, classes, out_dir, captions=captions)
    if embed:
        features = penultimate_features(predictor.model, arch, x)
        by_folder = all(p.parent.name in classes for p in readable)
        labels = (np.array([classes.index(p.parent.name) for p in readable]) if by_folder
                  else shown.argmax(1))
        title = ("t-SNE of penultimate features, coloured by "
                 + ("folder (true class)" if by_folder else "predicted class"))
        figure = tsne_plot(features, labels, classes, title=title)
        path = Path(out_dir) / "tsne.png"
        figure.savefig(path, dpi=120)
        written.append(path)
    return ExplainReport(written, unreadable)


OVERLAY_MIN_SIDE = 256  # pixels: smaller images are enlarged so that the heatmap can be seen


def _viewable(image: Image.Image) -> Image.Image:
    """`image` enlarged by a whole factor (nearest: no invented detail) up to OVERLAY_MIN_SIDE."""
    factor = -(-OVERLAY_MIN_SIDE // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
