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
- unusable files: left out (and listed in the file), so that the search does not stop on them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls.data.inspect import DataSummary
from imgcls.data.split import make_split
from imgcls.errors import DataError
from imgcls.models.catalog import find_weights

SMALL_DATA = 1000  # images: below, validation and test take 20% each (steadier scores)
IMBALANCED = 2.0  # largest class over the smallest: from here the loss is weighted
MAX_LISTED = 100  # unusable files listed in the study file


@dataclass(frozen=True)
class Machine:
    """What trains here: the CUDA devices' names (none: the CPU) and the CPU's cores."""

    gpus: tuple[str, ...]
    cores: int

    @classmethod
    def here(cls) -> Machine:
        from hpo.search.devices import discover_gpus
        from imgcls.train.runtime import available_cores

        return cls(tuple(g.name for g in discover_gpus()), available_cores())


@dataclass
class Draft:
    """A study's YAML text, and the choices it made, in a few words each."""

    text: str
    choices: list[str] = field(default_factory=list)


def study_name(path: Path) -> str:
    """A study name from the data's folder or file name: `/data/TB X-rays/` -> `tb-x-rays`."""
    stem = path.stem if path.is_file() else path.name
    name = re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")
    return name or "my-images"


def draft_study(summary: DataSummary, machine: Machine, seed: int = 0) -> Draft:
    """The study for `summary` on `machine`; DataError when no split can be made of it."""
    gpu = bool(machine.gpus)
    archs, pretrained = _architectures(gpu)
    size = _image_size(summary, gpu)
    channels = 1 if summary.grayscale else 3
    split, val, test = _split(summary)
    _check_split(summary, split, val, test, seed)
    train_images = summary.usable * (1 - val - test) if split != "given" else \
        (summary.given_splits or {}).get("train", summary.usable)
    batches = [b for b in ((32, 64, 128) if gpu else (16, 32, 64)) if b <= train_images / 4]
    batches = batches or [8]
    weighted = summary.imbalance >= IMBALANCED
    binary = len(summary.classes) == 2
    draft = Draft("")
    c = draft.choices
    c.append(("pretrained " if pretrained else "from scratch: ") + " and ".join(archs))
    c.append(f"{size} px, {channels} channel{'s' if channels == 3 else ''}")
    c.append(f"{split} split" + ("" if split == "given" else f" (val {val:.0%}, test {test:.0%})"))
    if weighted:
        c.append(f"class-weighted loss ({summary.imbalance:.1f}:1 imbalance)")
    trials, epochs = (40, 25) if gpu else (20, 15)

    lines = [
        f"# Written by `imgcls-hpo init` for {summary.path} ({summary.source}):",
        f"# {summary.usable} usable images in {len(summary.classes)} classes "
        f"({', '.join(f'{n} {k}' for k, n in zip(summary.classes, summary.counts, strict=True))})"
        f"; {_machine_words(machine)}.",
        "# Every choice below is a starting point: edit it, or override it on the command line",
        "# (imgcls-hpo search --help).",
        f"description: {_q(f'{summary.path.name}: ' + ', '.join(summary.classes))}",
        "data:",
        f"  source: {summary.source}",
        f"  path: {_q(str(summary.path.resolve()))}",
        f"  classes: [{', '.join(_q(k) for k in summary.classes)}]"
        + ("  # the second is the positive class of sensitivity and ROC" if binary else ""),
        f"  image_size: {size}"
        + f"  # typical shorter side {summary.side_quantiles(0.5)[0]} px; "
        + ("224 is what ImageNet nets were trained at" if gpu else "small enough for the CPU"),
        f"  channels: {channels}"
        + ("  # every image is grayscale" if channels == 1 else ""),
        f"  split: {split}" + {
            "given": "  # the split the data's layout gives",
            "group": "  # by the manifest's group column: no patient in two splits",
            "stratified": "  # each class in proportion in every split",
        }[split],
    ]
    note = "  # small data: 20% for steadier validation scores" \
        if summary.usable < SMALL_DATA else ""
    if split == "given":
        note = "  # drawn from train/ only for a split the layout lacks"
    lines += [f"  val_fraction: {val}{note}", f"  test_fraction: {test}"]
    if pretrained:
        lines.append("  normalize: imagenet   # what the pretrained weights expect")
    if summary.unusable:
        lines.append(f"  skip_bad_images: true  # {len(summary.unusable)} unusable file(s), "
                     "listed at the end")
    lines += [
        "objective: val_f1        # macro-F1: every class counts alike, whatever its size",
    ]
    if binary and weighted:
        lines.append("operating_point: youden  # the threshold that balances sensitivity and "
                     "specificity on validation")
        c.append("Youden threshold")
    lines += [
        f"trials: {trials}",
        f"max_epochs: {epochs}",
        "patience: 4",
        f"seed: {seed}",
        "sampler: tpe",
        "pruner: median",
        "# Each architecture first, at a learning rate that trains, so that the results compare"
        " them",
        "enqueue:",
        *(f"  - {_baseline(arch, archs, pretrained, batches)}" for arch in archs),
        "space:",
        f"  arch: {','.join(archs)}",
        f"  pretrained: {'true' if pretrained else 'false'}",
        "  optimizer: sgd",
        "  momentum: 0.9",
        "  lr: 1e-4..1e-1:log" if pretrained else "  lr: 1e-3..3e-1:log",
        f"  batch_size: {','.join(map(str, batches))}",
        "  weight_decay: 1e-6..1e-3:log",
        "  dropout: 0.0..0.5",
        "  label_smoothing: 0.0..0.1",
        f"  class_weighted: {'true' if weighted else 'false'}"
        + (f"  # {summary.imbalance:.1f}:1 between the largest and smallest class"
           if weighted else ""),
        "  hflip: 0.0,0.5         # set 0.0 where images have a side (X-rays, text)",
    ]
    if summary.unusable:
        lines.append("# Not usable (left out by skip_bad_images):")
        lines += [f"#   {note}" for note in summary.unusable[:MAX_LISTED]]
        if len(summary.unusable) > MAX_LISTED:
            lines.append(f"#   and {len(summary.unusable) - MAX_LISTED} more")
    draft.text = "\n".join(lines) + "\n"
    return draft


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
    catalog = summary.catalog
    if summary.unusable_index:
        keep = np.setdiff1d(np.arange(len(catalog)), np.asarray(summary.unusable_index))
        catalog = catalog.subset(keep)
    try:
        make_split(catalog, split, val, test, seed)
    except DataError as exc:
        raise DataError(f"no study can be written for {summary.path}: {exc}") from None


def _machine_words(machine: Machine) -> str:
    if machine.gpus:
        return f"written for {len(machine.gpus)} GPU(s) ({machine.gpus[0]})"
    return f"written for the CPU ({machine.cores} cores)"


def _q(text: str) -> str:
    """A YAML scalar that reads back as `text`: JSON's quoting is YAML's."""
    return json.dumps(text, ensure_ascii=False)
