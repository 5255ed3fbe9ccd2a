"""DataConfig: where a study's images come from, which of them it uses, and how they are shaped
and split. Plain validated data: importing it imports no torch."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgcls.data.cache import MAX_PIXELS
from imgcls.data.sources import SOURCES, check_classes
from imgcls.data.split import SPLITS
from imgcls.errors import ConfigError


class DataConfig(BaseModel):
    """Where the images come from, which of them are used, and how they are shaped and split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "folder"  # a name in SOURCES
    path: str | None = None  # the data folder, CSV manifest or .npz, for sources that read files
    # The classes to use, in this order (label i = classes[i]); others are left out. None: all,
    # sorted by name. A TB collection may hold more classes than a study's health and tb.
    classes: tuple[str, ...] | None = None
    image_size: int = Field(64, ge=8, le=2048)  # pixels per side after resizing
    channels: Literal[1, 3] = 3  # 1 = grayscale, 3 = RGB (grayscale images are replicated)
    split: str = "stratified"  # a name in SPLITS: stratified, sorted, group, given
    # A regular expression whose first capture group (else whole match) in each file name is
    # its group (patient, subject), for the group split; a CSV group column takes precedence.
    group_pattern: str | None = None
    val_fraction: float = Field(0.15, gt=0, lt=1)  # > 0: validation picks the best epoch
    test_fraction: float = Field(0.15, ge=0, lt=1)
    # "train": mean/std of the training split; "imagenet": the statistics pretrained nets expect
    normalize: Literal["train", "imagenet"] = "train"
    # Unreadable files and placeholders stop the study before training unless this leaves them
    # out (listed in PreparedData.skipped): a silently shrunk data set would go unnoticed.
    skip_bad_images: bool = False
    # Treat as unusable a file that decodes but is tiny, uniform or drawn with few colours
    # (not applied to array sources such as digits and npz, which hold no such files).
    check_placeholders: bool = True
    min_side: int = Field(16, ge=1)  # pixels: an image with a shorter side is a placeholder
    # An image with more pixels is unusable, refused before it is decoded (a decompression
    # bomb, or a whole-slide scan to tile first); predict applies the same default.
    max_pixels: int = Field(MAX_PIXELS, ge=1)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        return SOURCES.check_name(value)

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str) -> str:
        return SPLITS.check_name(value)

    @field_validator("classes", mode="before")
    @classmethod
    def _distinct_classes(cls, value: object) -> tuple[str, ...] | None:
        try:
            return check_classes(value)  # type: ignore[arg-type]
        except ConfigError as exc:  # pydantic reports a ValueError under the field's name
            raise ValueError(str(exc)) from None

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"group_pattern {value!r} is not a valid regular expression: "
                                 f"{exc}") from None
        return value
