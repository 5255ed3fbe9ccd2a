"""A first study for a user's own data: settings chosen from what the data holds
(`imgcls.data.inspect`) and what the machine can train, written as a commented YAML file that
`search` runs as it is.

The choices, each said in a comment of the file written:
- architectures: on a GPU, ResNet-18 and ResNet-50 (pretrained where both weights files are
  here); on the CPU, the small CNN and a ResNet-18 from scratch, or a pretrained ResNet-18 alone
  where its weights file is here (a network without ImageNet weights cannot share the search's
  `pretrained: true`);
- image size: 224 px on a GPU, 64 on the CPU, never above the images' typical side;
- channels: 1 when every image is grayscale;
- split: the one the layout gives (train/ and val/ folders, a CSV split column), by group where
  a CSV names groups, else stratified; more validation where the data is small;
- imbalance: the loss weighted by class rarity, and for two classes an operating point chosen
  on validation (Youden's J) instead of the 0.5 threshold;
- unusable files: left out (and listed in the file), so that the search does not stop on them;
- small data (under SMALL_DATA images): cross-validation (`folds: 5`) offered, commented out,
  since it trains each trial six times over: validation scores of a few dozen images move in
  steps of a few percent, and the folds' mean steadies them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from imgcls.data.inspect import DataSummary
from imgcls.data.split import make_split
from imgcls.errors import DataError
from imgcls.models.catalog import find_weights

SMALL_DATA = 1000  # images: below, validation and test take 20% each (steadier scores), and
# cross-validation is offered
FOLDS = 5
IMBALANCED = 2.0  # largest class over the smallest: from here the loss is weighted
MAX_LISTED = 100  # unusable files listed in the study file


@dataclass(frozen=True)
class Machine:
    """What trains here: the CUDA devices' names (none: the CPU) and the CPU's cores."""

    gpus: tuple[str, ...]
    cores: int


@dataclass(frozen=True)
class Draft:
    """A study's YAML text, and the choices it made, in a few words each."""

    text: str
    choices: list[str]


def study_name(path: Path) -> str:
    """A study name from the data's folder or file name: `/data/TB X-rays/` -> `tb-x-rays`."""
    stem = path.stem if path.is_file() else path.name
    name = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return name or "my-images"


@dataclass(frozen=True)
class Choices:
    """What a drafted study sets, before it is written out."""

    gpu: bool
    archs: list[str]
    pretrained: bool
    size: int
    channels: int
    split: str
    val: float
    test: float
    batches: list[int]
    weighted: bool  # a class-weighted loss
    threshold: bool  # two imbalanced classes: a Youden operating point

    def words(self, summary: DataSummary) -> list[str]:
        """The choices in a few words each, for the line that says what was written."""
        start = "pretrained: " if self.pretrained else "from scratch: "
        words = [start + " and ".join(self.archs),
                 f"{self.size} px, {self.channels} channel{'s' if self.channels == 3 else ''}",
                 f"{self.split} split" + ("" if self.split == "given"
                                          else f" (val {self.val:.0%}, test {self.test:.0%})")]
        if self.weighted:
            words.append(f"class-weighted loss ({summary.imbalance:.1f}:1 imbalance)")
        if self.threshold:
            words.append("Youden threshold")
        if summary.usable < SMALL_DATA:
            words.append(f"folds: {FOLDS} offered (commented out)")
        return words


def draft_study(summary: DataSummary, machine: Machine, seed: int = 0) -> Draft:
    """The study for `summary` on `machine`; DataError when no split can be made of it."""
    choices = choose(summary, machine, seed)
    lines = [
        f"# Written by `imgcls-hpo init` for {summary.path} ({summary.source}):",
        f"# {summary.usable} usable images in {len(summary.classes)} classes "
        f"({', '.join(f'{n} {k}' for k, n in zip(summary.classes, summary.counts, strict=True))})"
        f"; {_machine_words(machine)}.",
        "# Every choice below is a starting point: edit it, or override it on the command line",
        "# (imgcls-hpo search --help).",
        f"description: {_q(f'{summary.path.name}: ' + ', '.join(summary.classes))}",
        *_data_lines(summary, choices),
        *_search_lines(summary, choices, seed),
    ]
    if notes := summary.unusable:
        lines.append("# Not usable (left out by skip_bad_images):")
        lines += [f"#   {note}" for note in notes[:MAX_LISTED]]
        if len(notes) > MAX_LISTED:
            lines.append(f"#   and {len(notes) - MAX_LISTED} more")
    return Draft("\n".join(lines) + "\n", choices.words(summary))


def choose(summary: DataSummary, machine: Machine, seed: int = 0) -> Choices:
    """The settings for `summary` on `machine` (see the module docstring); the split is made
    once here, so that one that cannot be made is a DataError now."""
    gpu = bool(machine.gpus)
    archs, pretrained = _architectures(gpu)
    split, val, test = _split(summary)
    _check_split(summary, split, val, test, seed)
    train_images = summary.usable * (1 - val - test) if split != "given" else \
        (summary.given_splits or {}).get("train", summary.usable)
    batches = [b for b in ((32, 64, 128) if gpu else (16, 32, 64)) if b <= train_images / 4]
    weighted = summary.imbalance >= IMBALANCED
    return Choices(gpu, archs, pretrained, _image_size(summary, gpu),
                   1 if summary.grayscale else 3, split, val, test, batches or [8], weighted,
                   weighted and len(summary.classes) == 2)


def _data_lines(summary: DataSummary, c: Choices) -> list[str]:
    binary = len(summary.classes) == 2
    lines = [
        "data:",
        f"  source: {summary.source}",
        f"  path: {_q(str(summary.path.resolve()))}",
        f"  classes: [{', '.join(_q(k) for k in summary.classes)}]"
        + ("  # the second is the positive class of sensitivity and ROC" if binary else ""),
        f"  image_size: {c.size}  # typical shorter side {summary.side_quantiles(0.5)[0]} px; "
        + ("224 is what ImageNet nets were trained at" if c.gpu else "small enough for the CPU"),
        f"  channels: {c.channels}" + ("  # every image is grayscale" if c.channels == 1 else ""),
        f"  split: {c.split}" + {
            "given": "  # the split the data's layout gives",
            "group": "  # by the manifest's group column: no patient in two splits",
            "stratified": "  # each class in proportion in every split",
        }[c.split],
    ]
    note = "  # small data: 20% for steadier validation scores" \
        if summary.usable < SMALL_DATA else ""
    if c.split == "given":
        note = "  # drawn from train/ only for a split the layout lacks"
    lines += [f"  val_fraction: {c.val}{note}", f"  test_fraction: {c.test}"]
    if c.pretrained:
        lines.append("  normalize: imagenet   # what the pretrained weights expect")
    if summary.bad:
        lines.append(f"  skip_bad_images: true  # {len(summary.bad)} unusable file(s), "
                     "listed at the end")
    return lines


def _search_lines(summary: DataSummary, c: Choices, seed: int) -> list[str]:
    trials, epochs = (40, 25) if c.gpu else (20, 15)
    lines = ["objective: val_f1        # macro-F1: every class counts alike, whatever its size"]
    if c.threshold:
        lines.append("operating_point: youden  # the threshold that balances sensitivity and "
                     "specificity on validation")
    return [
        *lines,
        f"trials: {trials}",
        f"max_epochs: {epochs}",
        "patience: 4",
        f"seed: {seed}",
        *_folds_lines(summary, c),
        "sampler: tpe",
        "pruner: median",
        "# Each architecture first, at a learning rate that trains, so that the results compare"
        " them",
        "enqueue:",
        *(f"  - {_baseline(arch, c.archs, c.pretrained, c.batches)}" for arch in c.archs),
        "space:",
        f"  arch: {','.join(c.archs)}",
        f"  pretrained: {'true' if c.pretrained else 'false'}",
        "  optimizer: sgd",
        "  momentum: 0.9",
        "  lr: 1e-4..1e-1:log" if c.pretrained else "  lr: 1e-3..3e-1:log",
        f"  batch_size: {','.join(map(str, c.batches))}",
        "  weight_decay: 1e-6..1e-3:log",
        "  dropout: 0.0..0.5",
        "  label_smoothing: 0.0..0.1",
        f"  class_weighted: {'true' if c.weighted else 'false'}"
        + (f"  # {summary.imbalance:.1f}:1 between the largest and smallest class"
           if c.weighted else ""),
        "  hflip: 0.0,0.5         # set 0.0 where images have a side (X-rays, text)",
    ]


def _folds_lines(summary: DataSummary, c: Choices) -> list[str]:
    """Cross-validation, offered for small data: the line to uncomment, and when to."""
    if summary.usable >= SMALL_DATA:
        return []
    val = round(summary.usable * c.val) if c.split != "given" else \
        (summary.given_splits or {}).get("val", 0)
    return [f"# Small data ({summary.usable} images): the best trial is chosen on {val} "
            f"validation images, where each one",
            f"# right or wrong moves the score by {1 / max(val, 1):.1%}. With folds: {FOLDS}, "
            "every trial is judged by its mean",
            f"# over {FOLDS} folds of train and val together (the deviation logged beside it) "
            "and its model is",
            "# refit on both for the test split: a steadier choice, for "
            f"{FOLDS + 1}x the training time.",
            f"# folds: {FOLDS}"]


def _baseline(arch: str, archs: list[str], pretrained: bool, batches: list[int]) -> str:
    """A first trial for `arch`, setting only what the study searches."""
    values = {"arch": arch} if len(archs) > 1 else {}
    values["lr"] = 0.01 if pretrained else 0.05
    if len(batches) > 1:
        values["batch_size"] = batches[-1]
    return "{" + ", ".join(f"{k}: {v}" for k, v in values.items()) + "}"


def _architectures(gpu: bool) -> tuple[list[str], bool]:
    if gpu:
        archs = ["resnet18", "resnet50"]
        return archs, all(find_weights(a) is not None for a in archs)
    if find_weights("resnet18") is not None:
        return ["resnet18"], True
    return ["simplecnn", "resnet18"], False


def _image_size(summary: DataSummary, gpu: bool) -> int:
    """224 (GPU) or 64 (CPU), but not above the typical shorter side (rounded up to 8 px)."""
    target = 224 if gpu else 64
    side = summary.side_quantiles(0.5)[0]
    return max(32, min(target, -(-side // 8) * 8))


def _split(summary: DataSummary) -> tuple[str, float, float]:
    small = summary.usable < SMALL_DATA
    fraction = 0.2 if small else 0.15
    given = summary.catalog.given
    if given is not None and (given >= 0).all():
        return "given", fraction, fraction
    return ("group" if summary.grouped else "stratified"), fraction, fraction


def _check_split(summary: DataSummary, split: str, val: float, test: float, seed: int) -> None:
    """The split the study will make, made now: too few images of a class is one line here."""
    try:
        make_split(summary.usable_catalog, split, val, test, seed)
    except DataError as exc:
        raise DataError(f"no study can be written for {summary.path}: {exc}") from None


def _machine_words(machine: Machine) -> str:
    if machine.gpus:
        return f"written for {len(machine.gpus)} GPU(s) ({machine.gpus[0]})"
    return f"written for the CPU ({machine.cores} cores)"


def _q(text: str) -> str:
    """A YAML scalar that reads back as `text`: JSON's quoting is YAML's."""
    return json.dumps(text, ensure_ascii=False)
