"""MC-dropout, flip TTA and predictive entropy: what `predict --mc-dropout/--tta` reports."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgcls.errors import ConfigError
from imgcls.models import build_model
from imgcls.predict import UNKNOWN, Predictor, Preprocessing, image_files, summary, write_csv
from imgcls.uncertainty import (
    Sampling,
    entropy_ranks,
    flip_views,
    mc_dropout,
    predictive_entropy,
)
from tests.conftest import make_image_folder

CLASSES = ("ants", "bees", "wasps")


def predictor(dropout: float = 0.5, hflip: float = 0.5, vflip: float = 0.0) -> Predictor:
    prep = Preprocessing("simplecnn", CLASSES, 16, 3, "train", (0.4,) * 3, (0.25,) * 3,
                         dropout=dropout, hflip=hflip, vflip=vflip)
    torch.manual_seed(0)
    model = build_model("simplecnn", len(CLASSES), 3, 0.0, 16)
    return Predictor.from_state_dict(model.state_dict(), prep)


def probs(predictions: list) -> np.ndarray:
    return np.array([[p.probabilities[c] for c in CLASSES] for p in predictions])


def test_entropy_lies_between_zero_and_log_k_and_ranks_put_the_least_sure_first() -> None:
    k = 4
    one_hot, uniform = np.eye(k)[:1], np.full((1, k), 1 / k)
    assert predictive_entropy(one_hot)[0] == 0
    assert predictive_entropy(uniform)[0] == pytest.approx(math.log(k))
    random = np.random.default_rng(0).dirichlet(np.ones(k), size=50)
    h = predictive_entropy(random)
    assert h.shape == (50,) and (h >= 0).all() and (h <= math.log(k) + 1e-12).all()
    assert entropy_ranks(np.array([0.1, 0.9, 0.5])).tolist() == [3, 1, 2]


def test_flip_views_are_the_flips_trained_with() -> None:
    assert flip_views(0, 0) == [()]
    assert flip_views(0.5, 0) == [(), (-1,)]
    assert flip_views(0.5, 0.2) == [(), (-1,), (-2,), (-2, -1)]


def test_mc_dropout_samples_only_the_dropout_layers_and_restores_eval_mode() -> None:
    pred = predictor()
    with mc_dropout(pred.model):
        modes = {type(m): m.training for m in pred.model.modules()
                 if isinstance(m, nn.Dropout | nn.BatchNorm2d)}
    assert modes == {nn.Dropout: True, nn.BatchNorm2d: False}
    assert not any(m.training for m in pred.model.modules())


def test_mc_dropout_varies_with_the_seed_and_repeats_with_it(tmp_path: Path) -> None:
    files = image_files(make_image_folder(tmp_path / "d", per_class=3))
    pred = predictor(dropout=0.5)
    plain = probs(pred.predict_files(files))
    runs = {seed: probs(pred.predict_files(files, sampling=Sampling(8, seed=seed)))
            for seed in (1, 1, 2)}
    again = probs(pred.predict_files(files, sampling=Sampling(8, seed=1)))
    np.testing.assert_array_equal(runs[1], again)
    assert not np.allclose(runs[1], runs[2])
    assert not np.allclose(runs[1], plain)
    np.testing.assert_allclose(runs[1].sum(axis=1), 1, atol=1e-5)
    # a single pass is the deterministic eval-mode prediction, whatever the seed
    np.testing.assert_array_equal(
        probs(pred.predict_files(files, sampling=Sampling(1, seed=5))), plain)


def test_mc_dropout_is_refused_without_dropout_and_tta_without_flips(tmp_path: Path) -> None:
    file = make_image_folder(tmp_path / "d", per_class=1) / "ants"
    with pytest.raises(ConfigError, match=r"^MC-dropout needs dropout, and this simplecnn"):
        predictor(dropout=0.0).predict_files([file], sampling=Sampling(4))
    with pytest.raises(ConfigError, match=r"^TTA uses the flips the model trained with"):
        predictor(hflip=0.0).predict_files([file], sampling=Sampling(tta=True))
    with pytest.raises(ConfigError, match="passes must be at least 1"):
        Sampling(0)


def test_tta_averages_the_image_and_its_mirror(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=2)
    files = image_files(root)
    mirrored = []
    for i, f in enumerate(files):
        out = tmp_path / "m" / f"{i}.png"
        out.parent.mkdir(exist_ok=True)
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out)
        mirrored.append(out)
    pred = predictor(dropout=0.0, hflip=0.5)
    expected = (probs(pred.predict_files(files)) + probs(pred.predict_files(mirrored))) / 2
    got = pred.predict_files(files, sampling=Sampling(tta=True))
    np.testing.assert_allclose(probs(got), expected, atol=1e-6)
    assert all(p.entropy is not None for p in got)


def test_entropies_ranks_and_max_entropy_reach_the_csv_and_summary(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "ants" / "broken.png").write_bytes(b"not a png")
    pred = predictor()
    predictions = pred.predict_files(root, sampling=Sampling(4, tta=True, seed=0))
    readable = [p for p in predictions if p.readable]
    assert sorted(p.entropy_rank for p in readable) == list(range(1, len(readable) + 1))
    least_sure = next(p for p in readable if p.entropy_rank == 1)
    assert least_sure.entropy == max(p.entropy for p in readable)
    counts = summary(predictions)["entropy"]
    assert counts["bound"] == pytest.approx(math.log(3))
    assert 0 <= counts["mean"] <= counts["max"] <= counts["bound"]

    write_csv(predictions, tmp_path / "p.csv", CLASSES)
    with (tmp_path / "p.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-3:] == ["entropy", "entropy_rank", "error"]
    broken = next(r for r in rows if r["error"])
    assert broken["entropy"] == "" and broken["entropy_rank"] == ""
    # every softmax has some entropy: a bound of 0 makes every readable image unknown
    strict = pred.predict_files(root, max_entropy=0.0)
    assert {p.prediction for p in strict if p.readable} == {UNKNOWN}
    assert {p.prediction for p in pred.predict_files(root, max_entropy=math.log(3))} != {UNKNOWN}


def test_training_settings_travel_with_the_metadata_and_default_to_none() -> None:
    prep = predictor(dropout=0.3, hflip=0.5, vflip=0.1).preprocessing
    assert Preprocessing.from_metadata(prep.to_metadata()) == prep
    older = {k: v for k, v in prep.to_metadata().items()
             if k not in ("dropout", "hflip", "vflip")}
    assert Preprocessing.from_metadata(older).dropout == 0.0
    assert Preprocessing.from_metadata(older).hflip == 0.0


def test_explain_captions_each_overlay_and_with_sampling_its_entropy(tmp_path: Path) -> None:
    from imgcls.explain import explain_files

    root = make_image_folder(tmp_path / "d", per_class=2, size=16)
    pred = predictor(dropout=0.5)
    plain = explain_files(pred, root, tmp_path / "plain")
    sampled = explain_files(pred, root, tmp_path / "mc", sampling=Sampling(8, seed=1))
    again = explain_files(pred, root, tmp_path / "mc2", sampling=Sampling(8, seed=1))
    files = image_files(root)
    mean = probs(pred.predict_files(files, sampling=Sampling(8, seed=1)))
    for path, row in zip(sampled.written, mean, strict=True):  # the overlays carry the mean
        k = int(row.argmax())
        assert path.name.endswith(f"_{CLASSES[k]}_p{row[k]:.2f}.png")
    assert [p.name for p in again.written] == [p.name for p in sampled.written]
    for a, b in zip(sampled.written, again.written, strict=True):  # a seed repeats them
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    with Image.open(plain.written[0]) as image:
        width, height = image.size
        strip = np.asarray(image.convert("L"))[256:]
    assert width == 256 and height > 256  # 16 px enlarged to 256, and a caption strip below
    assert strip.max() > 128 and strip.mean() < 128  # white text on black
    with pytest.raises(ConfigError, match=r"^MC-dropout needs dropout"):
        explain_files(predictor(dropout=0.0), root, tmp_path / "no", sampling=Sampling(4))


def test_a_caption_says_the_class_its_probability_and_the_doubt() -> None:
    from imgcls.explain import caption

    assert caption("bees", 0.934) == "bees  p=0.93"
    assert caption("bees", 0.934, 0.2112, 2, 8) == "bees  p=0.93  entropy 0.21 nats, rank 2/8"
