"""Classify image files with a trained model and the preprocessing it was trained with.

A model alone cannot predict: it needs the classes its outputs stand for and the exact input it
saw in training (image size, channels, normalization). `Preprocessing` holds that contract as
plain data, the `imgcls` metadata dict that every finished trial logs with its model, so that
weights plus that dict are enough to predict (as a timm checkpoint carries its data config).

Images go through the training pipeline's own code: `imgcls.data.cache.to_array` decodes and
resizes, `imgcls.data.batches.Batches` normalizes. Nothing here re-implements a step, so a file
is seen by the predictor exactly as the training set's copy of it was.

Edge policies, decided here:
- A file that cannot be decoded does not stop `predict_files`: its row carries the reason in
  `error` and no prediction. `prepare` and `probabilities`, which return one array for all
  inputs, raise DataError naming the bad input instead.
- With a `threshold`, a top probability below it gives the label "unknown"; the probabilities
  are still reported. A model with a class named "unknown" cannot take a threshold.
- Folders are searched recursively for the extensions the folder source reads, sorted, skipping
  hidden files and folders (as training does); a file named explicitly is always tried.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image
from torch import nn

from imgcls.data.batches import Batches
from imgcls.data.cache import Progress, to_array
from imgcls.data.prepare import PreparedData
from imgcls.data.sources import IMAGE_EXTENSIONS, images_below, listing
from imgcls.errors import ConfigError, DataError, first_line
from imgcls.metrics import decide
from imgcls.models.build import build_model
from imgcls.report import write_predictions
from imgcls.uncertainty import (
    Sampling,
    dropout_layers,
    entropy_ranks,
    flip_views,
    mc_dropout,
    predictive_entropy,
    sample_probabilities,
)

__all__ = [
    "UNKNOWN", "EnsemblePredictor", "ImageInput", "Prediction", "Predictor", "Preprocessing",
    "image_files",
    "summary", "write_csv",
]

UNKNOWN = "unknown"  # the label of an image whose top probability is below the threshold

# What `prepare` and `probabilities` take: a PIL image, an encoded file's bytes, or a path.
ImageInput: TypeAlias = Image.Image | bytes | str | os.PathLike[str]


@dataclass(frozen=True)
class Preprocessing:
    """What a model's input and output mean: its architecture, classes and input contract."""

    arch: str  # a name in imgcls.models.MODELS
    classes: tuple[str, ...]  # output i is classes[i]
    image_size: int  # pixels per side after resizing (straight to a square, no crop)
    channels: int  # 1 = luminance, 3 = RGB
    normalize: str  # where mean/std came from: "train" (training split) or "imagenet"
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]  # per channel, on the 0..1 scale
    # Two classes: the probability of classes[1] at or above which it is predicted, chosen by
    # the study's operating point on validation; None: the most probable class (argmax)
    decision_threshold: float | None = None
    # What the logits are divided by before the softmax: temperature scaling fitted on
    # validation, so that the probabilities served mean what they say; 1: as trained
    temperature: float = 1.0
    # How the model was trained, for uncertainty when predicting: its dropout rate (sampled by
    # MC-dropout) and flip probabilities (the views of flip TTA); 0 in metadata without them
    dropout: float = 0.0
    hflip: float = 0.0
    vflip: float = 0.0

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes) \
                or "" in self.classes:
            raise ConfigError(f"preprocessing classes {list(self.classes)} must be at least two "
                              "distinct, non-empty names")
        if self.channels not in (1, 3):
            raise ConfigError(f"preprocessing channels must be 1 or 3, not {self.channels}")
        if self.image_size < 1:
            raise ConfigError(f"preprocessing image_size must be positive, not {self.image_size}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(f"preprocessing has {len(self.mean)} mean and {len(self.std)} std "
                              f"values for {self.channels} channel(s); give one per channel")
        if not all(s > 0 for s in self.std):
            raise ConfigError(f"preprocessing std {list(self.std)} must be positive")
        if self.decision_threshold is not None and len(self.classes) != 2:
            raise ConfigError(f"a decision threshold needs two classes, not {len(self.classes)}")
        if not self.temperature > 0:
            raise ConfigError(f"preprocessing temperature must be positive, not "
                              f"{self.temperature}")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Preprocessing:
        """From the `imgcls` metadata dict a model was logged with. Other keys are ignored, so
        that metadata written by a later version still reads."""
        missing = [f.name for f in fields(cls)
                   if f.name not in metadata and f.default is MISSING]
        if missing:
            raise ConfigError(f"model metadata lacks {', '.join(missing)} (found: "
                              f"{', '.join(map(str, metadata)) or 'nothing'}); it must be the "
                              "'imgcls' dict a trial logs with its model")
        try:
            return cls(
                arch=str(metadata["arch"]),
                classes=tuple(str(c) for c in metadata["classes"]),
                image_size=int(metadata["image_size"]),
                channels=int(metadata["channels"]),
                normalize=str(metadata["normalize"]),
                mean=tuple(float(v) for v in metadata["mean"]),
                std=tuple(float(v) for v in metadata["std"]),
                decision_threshold=None if metadata.get("decision_threshold") is None
                else float(metadata["decision_threshold"]),
                temperature=float(metadata.get("temperature", 1.0)),
                dropout=float(metadata.get("dropout", 0.0)),
                hflip=float(metadata.get("hflip", 0.0)),
                vflip=float(metadata.get("vflip", 0.0)),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model metadata has a bad value ({first_line(exc)}); it must be "
                              "the 'imgcls' dict a trial logs with its model") from None

    @classmethod
    def from_data(cls, data: PreparedData, arch: str,
                  decision_threshold: float | None = None) -> Preprocessing:
        """The preprocessing that `data` feeds a model built as `arch`."""
        config = data.config
        return cls(arch, tuple(data.classes), config.image_size, config.channels,
                   config.normalize, tuple(data.mean), tuple(data.std), decision_threshold)

    def to_metadata(self) -> dict[str, Any]:
        """Plain JSON/YAML data (lists, not tuples: YAML's safe dumper refuses tuples)."""
        return {"arch": self.arch, "classes": list(self.classes), "image_size": self.image_size,
                "channels": self.channels, "normalize": self.normalize,
                "mean": list(self.mean), "std": list(self.std),
                "decision_threshold": self.decision_threshold, "temperature": self.temperature,
                "dropout": self.dropout, "hflip": self.hflip, "vflip": self.vflip}

    def trained_with(self, dropout: float, hflip: float, vflip: float) -> Preprocessing:
        """This preprocessing, recording the training settings that uncertainty reuses."""
        return replace(self, dropout=dropout, hflip=hflip, vflip=vflip)


@dataclass(frozen=True)
class Prediction:
    """One file's prediction, or why it could not be read."""

    file: str  # the path as found: a path given, or one below a folder given
    prediction: str | None  # a class, UNKNOWN below the threshold, None when unreadable
    probability: float | None  # the top class probability; None when unreadable
    probabilities: dict[str, float]  # every class's, in the model's order; empty when unreadable
    error: str | None = None  # one line: why the file could not be read
    entropy: float | None = None  # predictive entropy in nats, with uncertainty asked for
    entropy_rank: int | None = None  # 1 = the least sure readable image of the call

    @property
    def readable(self) -> bool:
        return self.error is None


class Predictor:
    """An eval-mode model with its preprocessing: images in, class probabilities out."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing,
                 device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        # A torch.export graph (MLflow's pt2 format) refuses eval(): it was traced in eval mode
        # and stays so.
        with contextlib.suppress(NotImplementedError):
            self.model.eval()
        self.preprocessing = preprocessing

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor],
                        preprocessing: Preprocessing,
                        device: torch.device | str = "cpu") -> Predictor:
        """Rebuild `preprocessing.arch` for its classes, channels and image size and load the
        weights strictly. Dropout is the rate trained with: it does nothing in eval mode and has
        no weights, but MC-dropout samples at that rate."""
        p = preprocessing
        model = build_model(p.arch, len(p.classes), p.channels, p.dropout, p.image_size)
        expected = model.state_dict()
        problems = [f"missing {key}" for key in expected if key not in state_dict]
        problems += [f"unexpected {key}" for key in state_dict if key not in expected]
        problems += [
            f"{key} has shape {tuple(value.shape)}, needs {tuple(expected[key].shape)}"
            for key, value in state_dict.items()
            if key in expected and tuple(value.shape) != tuple(expected[key].shape)
        ]
        if not problems:
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as exc:  # e.g. a dtype that cannot be copied
                problems = [first_line(exc)]
        if problems:
            raise ConfigError(
                f"the weights do not fit {p.arch} built for {len(p.classes)} classes, "
                f"{p.channels} channel(s) and {p.image_size}px: {listing(problems)}; check that "
                "the preprocessing metadata belongs to these weights"
            )
        return cls(model, p, device)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.preprocessing.classes

    @property
    def explained(self) -> Predictor:
        """The predictor whose network Grad-CAM and the embedding read: this one."""
        return self

    def prepare(self, images: Sequence[ImageInput] | ImageInput) -> torch.Tensor:
        """The normalized float batch (N, C, S, S), on the predictor's device, that training fed
        the model for these images. An unreadable input raises DataError naming it."""
        return self.normalized(self.decode(images))

    def normalized(self, arrays: np.ndarray) -> torch.Tensor:
        """`prepare` for images `decode` gave: the normalized float batch on the device."""
        if not len(arrays):
            return torch.empty((0, *arrays.shape[1:]), device=self.device)
        return torch.cat([x for x, _ in self._batches(arrays, None)])

    def sampled_probabilities(self, arrays: np.ndarray, sampling: Sampling,
                              batch_size: int = 32) -> np.ndarray:
        """(N, K) mean probabilities over `sampling`'s passes and views of images `decode`
        gave, the dropout masks seeded as `predict_files` seeds them."""
        self.check_sampling(sampling)
        with self._seeded(sampling):
            return self._probabilities(arrays, batch_size, sampling)

    def probabilities(self, images: Sequence[ImageInput] | ImageInput,
                      batch_size: int = 32) -> np.ndarray:
        """Class probabilities (N, K), float32, rows summing to 1, in `classes` order."""
        return self._probabilities(self.decode(images), batch_size)

    def predict_files(self, paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], *,
                      batch_size: int = 32, threshold: float | None = None,
                      progress: Progress | None = None, sampling: Sampling | None = None,
                      max_entropy: float | None = None) -> list[Prediction]:
        """A prediction for every image file in `paths` (files, or folders searched recursively),
        in order. Files are decoded and classified `batch_size` at a time, so memory stays flat
        however many there are; `progress(done, total)` is called after each batch.

        With `sampling` (MC-dropout, flip TTA) the probabilities are the mean over the samples;
        with it or `max_entropy` every readable image gets its predictive entropy and rank, and
        one above `max_entropy` (nats) is "unknown" as one below `threshold` is."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
        if threshold is not None and not 0 <= threshold <= 1:
            raise ConfigError(f"threshold must be a probability in [0, 1], not {threshold}")
        if max_entropy is not None and not max_entropy >= 0:
            raise ConfigError(f"max_entropy must be a non-negative entropy in nats, "
                              f"not {max_entropy}")
        if (threshold is not None or max_entropy is not None) and UNKNOWN in self.classes:
            raise ConfigError(f"the model has a class named {UNKNOWN!r}, so a threshold's "
                              f"{UNKNOWN!r} would be ambiguous; predict without a threshold")
        if sampling is not None:
            self.check_sampling(sampling)
        files = image_files(paths)
        predictions: list[Prediction] = []
        uncertain = sampling is not None or max_entropy is not None
        # PIL releases the GIL while decoding and resizing, so threads use every core; the
        # dropout masks come from a generator seeded once, outside of which nothing changes.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, self._seeded(sampling):
            for start in range(0, len(files), batch_size):
                chunk = files[start:start + batch_size]
                decoded = list(pool.map(self._try_decode, chunk))
                arrays = [array for array, _ in decoded if array is not None]
                rows = iter(self._probabilities(np.stack(arrays), batch_size, sampling)
                            if arrays else [])
                for file, (array, error) in zip(chunk, decoded, strict=True):
                    if array is None:
                        predictions.append(Prediction(str(file), None, None, {}, error))
                    else:
                        predictions.append(self._prediction(str(file), next(rows), threshold,
                                                            max_entropy, uncertain))
                if progress is not None:
                    progress(start + len(chunk), len(files))
        return with_entropy_ranks(predictions) if uncertain else predictions

    def check_sampling(self, sampling: Sampling) -> None:
        """ConfigError when `sampling` asks for what this model cannot vary: MC-dropout without a
        dropout layer above rate 0, or TTA without a flip it trained with."""
        p = self.preprocessing
        if sampling.passes > 1 and not dropout_layers(self.model):
            raise ConfigError(f"MC-dropout needs dropout, and this {p.arch} has none (trained "
                              f"with dropout {p.dropout:g}); predict without --mc-dropout, or "
                              "promote a trial that searched dropout > 0")
        if sampling.tta and len(flip_views(p.hflip, p.vflip)) == 1:
            raise ConfigError(f"TTA uses the flips the model trained with, and this {p.arch} "
                              "trained with none (hflip = vflip = 0); predict without --tta")

    def _seeded(self, sampling: Sampling | None) -> contextlib.AbstractContextManager[Any]:
        """The global RNG forked and seeded for `sampling`'s dropout masks, restored after."""
        if sampling is None or sampling.passes == 1:
            return contextlib.nullcontext()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        forked = contextlib.ExitStack()
        forked.enter_context(torch.random.fork_rng(devices=devices))
        torch.manual_seed(sampling.seed)
        return forked

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """The predicted class index per row of probabilities (N, K): at the model's decision
        threshold when it has one, else the most probable class."""
        return decide(probs, self.preprocessing.decision_threshold)

    def _prediction(self, file: str, probs: np.ndarray, threshold: float | None,
                    max_entropy: float | None = None, uncertain: bool = False) -> Prediction:
        top = int(self.decide(probs[None])[0])
        probability = float(probs[top])
        entropy = float(predictive_entropy(probs[None])[0]) if uncertain else None
        below = threshold is not None and probability < threshold
        unsure = max_entropy is not None and entropy is not None and entropy > max_entropy
        return Prediction(file, UNKNOWN if below or unsure else self.classes[top], probability,
                          {c: float(v) for c, v in zip(self.classes, probs, strict=True)},
                          entropy=entropy)

    def _decode(self, image: ImageInput) -> np.ndarray:
        """uint8 (C, S, S), through the decoder the training cache uses."""
        size, channels = self.preprocessing.image_size, self.preprocessing.channels
        if isinstance(image, Image.Image):
            return to_array(image, size, channels)
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        # Opened, not yet decoded, as a source hands images to the cache: the decoder may still
        # pick a reduced JPEG scale. The block closes the file.
        with Image.open(source) as opened:
            return to_array(opened, size, channels)

    def _try_decode(self, path: Path) -> tuple[np.ndarray | None, str | None]:
        try:
            return self._decode(path), None
        except Exception as exc:  # any decoder error means the same thing: not a usable image
            return None, first_line(exc)

    def decode(self, images: Sequence[ImageInput] | ImageInput) -> np.ndarray:
        """uint8 (N, C, S, S) of every input; DataError naming the first that fails."""
        if isinstance(images, Image.Image | bytes | str | os.PathLike):
            images = [images]  # one image, not a sequence of characters or bytes
        p = self.preprocessing
        arrays = np.empty((len(images), p.channels, p.image_size, p.image_size), dtype=np.uint8)
        for i, image in enumerate(images):
            try:
                arrays[i] = self._decode(image)
            except Exception as exc:
                raise DataError(f"cannot read {_describe(image, i)} as an image "
                                f"({first_line(exc)}); pass a file PIL can open") from None
        return arrays

    def _batches(self, arrays: np.ndarray, batch_size: int | None) -> Batches:
        """Evaluation batches normalized as in training; None = all in one batch."""
        p = self.preprocessing
        n = len(arrays)
        return Batches(torch.from_numpy(arrays), torch.zeros(n, dtype=torch.long),
                       batch_size or n, train=False, mean=p.mean, std=p.std, device=self.device)

    def _probabilities(self, arrays: np.ndarray, batch_size: int,
                       sampling: Sampling | None = None) -> np.ndarray:
        """(N, K) probabilities; with `sampling`, the mean over its passes and views."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, not {batch_size}")
        sampling = sampling or Sampling()
        p = self.preprocessing
        views = flip_views(p.hflip, p.vflip) if sampling.tta else [()]
        modes = mc_dropout(self.model) if sampling.passes > 1 else contextlib.nullcontext()
        out: list[torch.Tensor] = []
        with torch.inference_mode(), modes:
            for x, _ in self._batches(arrays, batch_size):
                samples = sample_probabilities(self._logits, x, sampling.passes, views)
                out.append(samples.mean(dim=0).cpu())
        return (torch.cat(out).numpy() if out
                else np.zeros((0, len(self.classes)), dtype=np.float32))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        k = len(self.classes)
        if logits.ndim != 2 or logits.shape[1] != k:
            raise ConfigError(f"the model gives outputs of shape {tuple(logits.shape)} "
                              f"for {k} classes; its preprocessing does not belong to it")
        return logits / self.preprocessing.temperature


# What the members of an ensemble share: one decoding and normalization feeds them all (the
# members of one study do, these being its data settings)
SHARED_INPUT = ("classes", "image_size", "channels", "normalize", "mean", "std")


class EnsemblePredictor(Predictor):
    """Several models of one study as one predictor: the mean of their probabilities (each
    member's calibrated by its own temperature), decided at the ensemble's own threshold.
    Each image is decoded and normalized once for every member."""

    def __init__(self, members: Sequence[Predictor],
                 decision_threshold: float | None = None) -> None:
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least two models, not {len(members)}")
        first = members[0].preprocessing
        for member in members[1:]:
            differs = [name for name in SHARED_INPUT
                       if getattr(member.preprocessing, name) != getattr(first, name)]
            if differs:
                raise ConfigError(f"the models differ in {', '.join(differs)}, so one input "
                                  "cannot feed them all: ensemble trials of one study")
        self.members = list(members)
        preprocessing = replace(first, arch="+".join(m.preprocessing.arch for m in members),
                                decision_threshold=decision_threshold, temperature=1.0)
        super().__init__(nn.ModuleList([m.model for m in members]), preprocessing,
                         members[0].device)

    @property
    def explained(self) -> Predictor:
        """An average of networks has no one feature map: the first (best) member's."""
        return self.members[0]

    def check_sampling(self, sampling: Sampling) -> None:
        """Refused only when no member can vary so (a member without dropout, say, gives the
        same probabilities in each pass, and the others still sample)."""
        refusals = []
        for member in self.members:
            try:
                member.check_sampling(sampling)
            except ConfigError as exc:
                refusals.append(exc)
        if len(refusals) == len(self.members):
            raise ConfigError(f"none of the ensemble's models can: {refusals[0]}")

    def _probabilities(self, arrays: np.ndarray, batch_size: int,
                       sampling: Sampling | None = None) -> np.ndarray:
        return np.mean([m._probabilities(arrays, batch_size, sampling) for m in self.members],
                       axis=0).astype(np.float32)


def with_entropy_ranks(predictions: Sequence[Prediction]) -> list[Prediction]:
    """`predictions` with entropy_rank set among the readable ones (1 = highest entropy)."""
    scored = [i for i, p in enumerate(predictions) if p.entropy is not None]
    ranks = entropy_ranks(np.array([predictions[i].entropy for i in scored], dtype=np.float64))
    out = list(predictions)
    for i, rank in zip(scored, ranks, strict=True):
        out[i] = replace(out[i], entropy_rank=int(rank))
    return out


def _describe(image: ImageInput, index: int) -> str:
    if isinstance(image, Image.Image):
        return f"image {index} (a {image.mode} PIL image)"
    if isinstance(image, bytes):
        return f"image {index} ({len(image)} bytes)"
    return str(image)


def image_files(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[Path]:
    """The files to classify: each path that is a file, and the image files below each folder
    (recursive, sorted, hidden ones skipped), in the order given; a file reached twice counts
    once. A path that does not exist, or a folder without images, raises DataError."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = images_below(path, path)
            if not found:
                raise DataError(f"folder {path} holds no images (looked for "
                                f"{', '.join(IMAGE_EXTENSIONS)}, in sub-folders too)")
        elif path.exists():
            found = [path]
        else:
            raise DataError(f"image path not found: {path}; pass image files or folders")
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    if not files:
        raise DataError("no image paths given; pass image files or folders")
    return files


def write_csv(predictions: Sequence[Prediction], path: str | Path,
              classes: Sequence[str]) -> Path:
    """One row per prediction: file, prediction, probability, p_<class> per class, (entropy,
    entropy_rank, when the predictions have them), error. Probabilities to 6 decimals; an
    unreadable file has empty prediction and probability cells and its reason under error."""
    names = [str(c) for c in classes]
    probs = np.full((len(predictions), len(names)), np.nan)
    for i, p in enumerate(predictions):
        if not p.readable:
            continue
        if list(p.probabilities) != names:
            raise ValueError(f"{p.file} has probabilities for {list(p.probabilities)}, "
                             f"not for the classes {names}")
        probs[i] = [p.probabilities[c] for c in names]
    return write_predictions(path, [p.file for p in predictions], probs, names,
                             predictions=[p.prediction for p in predictions],
                             errors=[p.error for p in predictions],
                             extra=_uncertainty_columns(predictions))


def _uncertainty_columns(predictions: Sequence[Prediction]
                         ) -> dict[str, list[float | int | None]] | None:
    if all(p.entropy is None for p in predictions):
        return None
    return {"entropy": [p.entropy for p in predictions],
            "entropy_rank": [p.entropy_rank for p in predictions]}


def summary(predictions: Sequence[Prediction]) -> dict[str, Any]:
    """Counts: images, predictions per class (every class, zero included; "unknown" counted
    apart), unknown, unreadable; with entropies, their mean and maximum and the bound log K.
    The classes come from the readable predictions."""
    classes: dict[str, int] = {}
    for p in predictions:
        if p.readable:
            classes = dict.fromkeys(p.probabilities, 0)
            break
    unknown = unreadable = 0
    for p in predictions:
        if not p.readable:
            unreadable += 1
        elif p.prediction == UNKNOWN:
            unknown += 1
        elif p.prediction is not None:
            classes[p.prediction] += 1
    counts: dict[str, Any] = {"images": len(predictions), "classes": classes,
                              "unknown": unknown, "unreadable": unreadable}
    entropies = [p.entropy for p in predictions if p.entropy is not None]
    if entropies:
        counts["entropy"] = {"mean": float(np.mean(entropies)), "max": float(np.max(entropies)),
                             "bound": float(np.log(len(classes)))}
    return counts
