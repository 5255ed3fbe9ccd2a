import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpo.config.store import Store
from imgcls.data import Batches, DataConfig, prepare_data
from imgcls.errors import ConfigError, DataError
from imgcls.models import build_model
from imgcls.predict import (
    UNKNOWN,
    Prediction,
    Predictor,
    Preprocessing,
    image_files,
    summary,
    write_csv,
)
from tests.conftest import make_image_folder

CLASSES = ("ants", "bees")


def preprocessing(channels: int = 3, image_size: int = 16,
                  classes: tuple[str, ...] = CLASSES) -> Preprocessing:
    return Preprocessing("simplecnn", classes, image_size, channels, "train",
                         (0.4,) * channels, (0.25,) * channels)


def predictor(prep: Preprocessing, seed: int = 0) -> Predictor:
    """An untrained simplecnn with fixed weights: predicting needs no training to be tested."""
    torch.manual_seed(seed)
    model = build_model(prep.arch, len(prep.classes), prep.channels, 0.0, prep.image_size)
    return Predictor.from_state_dict(model.state_dict(), prep)


def rgb_noise(path: Path, size: int, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(("channels", "normalize"), [(3, "train"), (1, "imagenet")])
def test_prepare_feeds_the_model_what_training_fed_it(tmp_path: Path, channels: int,
                                                       normalize: str) -> None:
    root = make_image_folder(tmp_path / "d", per_class=4)
    # Files the decoder treats differently: a JPEG decoded at a reduced scale, transparency
    # composited onto black, 16-bit grey levels rescaled.
    rng = np.random.default_rng(1)
    rgb_noise(root / "ants" / "big.jpg", 64, seed=2)
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA").save(
        root / "bees" / "alpha.png")
    Image.fromarray(rng.integers(0, 65535, (18, 18), dtype=np.uint16)).save(
        root / "bees" / "deep.png")
    config = DataConfig(path=str(root), image_size=12, channels=channels, normalize=normalize,
                        val_fraction=0.25, test_fraction=0.25)
    data = prepare_data(config, seed=0)
    prep = Preprocessing.from_data(data, "simplecnn")
    files = [root / item for item in data.catalog.ids]
    assert {"ants/big.jpg", "bees/alpha.png", "bees/deep.png"} <= set(data.catalog.ids)

    fed = Batches(data.images, data.labels, len(files), train=False, mean=data.mean,
                  std=data.std)
    expected = torch.cat([x for x, _ in fed])
    pred = predictor(prep)
    assert torch.equal(pred.prepare(files), expected)
    assert torch.equal(pred.prepare([f.read_bytes() for f in files]), expected)
    with Image.open(files[0]) as image:
        assert torch.equal(pred.prepare(image), expected[:1])


def test_probabilities_sum_to_one_whatever_the_batch_size(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=3)
    files = image_files(root)
    pred = predictor(preprocessing())
    probs = pred.probabilities(files, batch_size=4)
    assert probs.shape == (6, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(pred.probabilities(files, batch_size=1), probs, atol=1e-6)
    with torch.inference_mode():
        direct = pred.model(pred.prepare(files)).softmax(dim=1).numpy()
    np.testing.assert_allclose(probs, direct, atol=1e-6)
    assert pred.probabilities([]).shape == (0, 2)


def test_predictions_name_the_most_probable_class_or_unknown_below_the_threshold(
        tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=3)
    pred = predictor(preprocessing())
    plain = pred.predict_files([root])
    probs = pred.probabilities(image_files(root))
    assert [p.file for p in plain] == [str(f) for f in image_files(root)]
    for p, row in zip(plain, probs, strict=True):
        assert p.prediction == CLASSES[int(row.argmax())]
        assert p.probability == pytest.approx(float(row.max()))
        assert list(p.probabilities) == list(CLASSES)
        assert p.error is None

    top = max(p.probability or 0.0 for p in plain)
    above_all = top + (1 - top) / 2
    doubtful = pred.predict_files([root], threshold=above_all)
    assert [p.prediction for p in doubtful] == [UNKNOWN] * 6
    assert [p.probabilities for p in doubtful] == [p.probabilities for p in plain]
    assert summary(doubtful) == {"images": 6, "classes": {"ants": 0, "bees": 0},
                                 "unknown": 6, "unreadable": 0}
    assert [p.prediction for p in pred.predict_files([root], threshold=0.0)] == \
        [p.prediction for p in plain]


def test_an_unreadable_file_gets_an_error_row_and_the_rest_are_predicted(
        tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "bees" / "broken.png").write_bytes(b"this is not a png")
    good = (root / "ants" / "000.png").read_bytes()
    (root / "bees" / "truncated.png").write_bytes(good[: len(good) // 2])
    seen: list[tuple[int, int]] = []
    pred = predictor(preprocessing())
    predictions = pred.predict_files(root, batch_size=3, progress=lambda d, n: seen.append((d, n)))

    assert len(predictions) == 8
    bad = {Path(p.file).name: p for p in predictions if p.error is not None}
    assert set(bad) == {"broken.png", "truncated.png"}
    assert bad["broken.png"].error is not None
    assert "cannot identify image file" in bad["broken.png"].error
    assert "\n" not in (bad["truncated.png"].error or "x\n")
    assert all(p.prediction is None and p.probability is None for p in bad.values())
    readable = [p for p in predictions if p.error is None]
    assert len(readable) == 6 and all(p.prediction in CLASSES for p in readable)
    assert seen == [(3, 8), (6, 8), (8, 8)]
    counts = summary(predictions)
    assert counts["unreadable"] == 2 and counts["unknown"] == 0
    assert sum(counts["classes"].values()) == 6

    path = write_csv(predictions, tmp_path / "out" / "preds.csv", pred.classes)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "prediction", "probability", "p_ants", "p_bees", "error"]
    assert [r["file"] for r in rows] == [p.file for p in predictions]
    broken = next(r for r in rows if r["file"].endswith("broken.png"))
    assert broken["prediction"] == broken["probability"] == broken["p_ants"] == ""
    assert broken["error"] == bad["broken.png"].error
    first = rows[0]
    assert first["file"].endswith("ants/000.png") and first["error"] == ""
    assert first["prediction"] == readable[0].prediction
    assert first["p_ants"] == f"{readable[0].probabilities['ants']:.6f}"
    assert len(first["p_ants"].split(".")[1]) == 6


def test_folders_are_searched_recursively_in_sorted_order(tmp_path: Path) -> None:
    root = tmp_path / "scans"
    for rel in ("b/2.png", "a/deep/er/1.PNG", "a/0.jpg", ".hidden/x.png", "a/._x.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        rgb_noise(root / rel, 16, seed=len(rel)) if not rel.endswith("._x.png") \
            else (root / rel).write_bytes(b"resource fork")
    (root / "a" / "notes.txt").write_text("not an image")
    loose = rgb_noise(tmp_path / "loose.bmp", 16, seed=9)
    found = image_files([loose, root, root / "b" / "2.png"])  # 2.png reached twice
    assert [f.relative_to(tmp_path).as_posix() for f in found] == [
        "loose.bmp", "scans/a/0.jpg", "scans/a/deep/er/1.PNG", "scans/b/2.png"]
    predictions = predictor(preprocessing()).predict_files([loose, root])
    assert [p.file for p in predictions] == [str(f) for f in found]
    assert all(p.error is None for p in predictions)


def test_paths_that_hold_no_images_are_named(tmp_path: Path) -> None:
    pred = predictor(preprocessing())
    with pytest.raises(DataError, match=r"^image path not found: .*missing\.png; pass image"):
        pred.predict_files([tmp_path / "missing.png"])
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not an image")
    message = rf"^folder {re.escape(str(empty))} holds no images \(looked for .*\.png.*too\)$"
    with pytest.raises(DataError, match=message):
        pred.predict_files([empty])
    with pytest.raises(DataError, match="no image paths given"):
        pred.predict_files([])


def test_a_grayscale_model_reads_rgb_files_and_an_rgb_model_grey_ones(tmp_path: Path) -> None:
    rgb = rgb_noise(tmp_path / "rgb.png", 20, seed=3)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (20, 20), dtype=np.uint8)).save(grey)

    def resized(path: Path, mode: str) -> torch.Tensor:
        with Image.open(path) as image:
            small = image.convert(mode).resize((16, 16), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255)

    grey_model = predictor(preprocessing(channels=1))
    x = grey_model.prepare([rgb])
    assert x.shape == (1, 1, 16, 16)
    torch.testing.assert_close(x[0, 0], (resized(rgb, "L") - 0.4) / 0.25)

    rgb_model = predictor(preprocessing(channels=3))
    x = rgb_model.prepare([grey])
    assert x.shape == (1, 3, 16, 16)
    for c in range(3):
        torch.testing.assert_close(x[0, c], (resized(grey, "L") - 0.4) / 0.25)
    assert grey_model.probabilities([rgb]).shape == rgb_model.probabilities([grey]).shape


def test_unreadable_input_to_probabilities_is_named(tmp_path: Path) -> None:
    pred = predictor(preprocessing())
    with pytest.raises(DataError, match=r"^cannot read image 1 \(17 bytes\) as an image "):
        pred.probabilities([(rgb_noise(tmp_path / "ok.png", 16, 0)).read_bytes(),
                            b"this is not a png"])


def test_weights_that_do_not_fit_the_architecture_are_refused() -> None:
    torch.manual_seed(0)
    three_classes = build_model("simplecnn", 3, 3).state_dict()
    with pytest.raises(ConfigError, match=r"^the weights do not fit simplecnn built for 2 "
                                          r"classes, 3 channel\(s\) and 16px: head\.1\.weight "
                                          r"has shape \(3, 128\), needs \(2, 128\)"):
        Predictor.from_state_dict(three_classes, preprocessing())
    grey = build_model("simplecnn", 2, 1).state_dict()
    with pytest.raises(ConfigError, match=r"features\.0\.weight has shape \(32, 1, 3, 3\)"):
        Predictor.from_state_dict(grey, preprocessing(channels=3))
    partial = {k: v for k, v in build_model("simplecnn", 2, 3).state_dict().items()
               if not k.startswith("head.")}
    with pytest.raises(ConfigError, match=r"missing head\.1\.weight; missing head\.1\.bias"):
        Predictor.from_state_dict(partial, preprocessing())
    with pytest.raises(ConfigError, match="unknown architecture 'resnet7'"):
        Predictor.from_state_dict(grey, Preprocessing("resnet7", CLASSES, 16, 3, "train",
                                                      (0.5,) * 3, (0.2,) * 3))


def test_preprocessing_travels_as_plain_metadata() -> None:
    prep = preprocessing(channels=1, image_size=24, classes=("health", "sick", "tb"))
    metadata = json.loads(json.dumps(prep.to_metadata()))
    assert Preprocessing.from_metadata(metadata) == prep
    assert Preprocessing.from_metadata({**metadata, "added_later": 1}) == prep
    del metadata["std"]
    with pytest.raises(ConfigError, match=r"^model metadata lacks std \(found: arch, classes"):
        Preprocessing.from_metadata(metadata)
    with pytest.raises(ConfigError, match=r"^model metadata has a bad value"):
        Preprocessing.from_metadata({**prep.to_metadata(), "image_size": "large"})
    with pytest.raises(ConfigError, match=r"2 mean and 2 std values for 1 channel"):
        Preprocessing("simplecnn", CLASSES, 16, 1, "train", (0.5, 0.5), (0.2, 0.2))
    with pytest.raises(ConfigError, match="channels must be 1 or 3, not 4"):
        Preprocessing("simplecnn", CLASSES, 16, 4, "train", (0.5,) * 4, (0.2,) * 4)
    with pytest.raises(ConfigError, match="at least two distinct"):
        Preprocessing("simplecnn", ("a", "a"), 16, 1, "train", (0.5,), (0.2,))


def test_threshold_settings_that_cannot_work_are_refused(tmp_path: Path) -> None:
    file = rgb_noise(tmp_path / "x.png", 16, 0)
    with pytest.raises(ConfigError, match=r"threshold must be a probability in \[0, 1\], not 1.5"):
        predictor(preprocessing()).predict_files([file], threshold=1.5)
    with pytest.raises(ConfigError, match="a class named 'unknown'"):
        predictor(preprocessing(classes=("cat", UNKNOWN))).predict_files([file], threshold=0.5)
    with pytest.raises(ConfigError, match="batch_size must be at least 1, not 0"):
        predictor(preprocessing()).predict_files([file], batch_size=0)


def test_summary_counts_every_class_even_those_never_predicted() -> None:
    probs = {"ants": 0.9, "bees": 0.1}
    predictions = [Prediction("a.png", "ants", 0.9, probs),
                   Prediction("b.png", UNKNOWN, 0.55, {"ants": 0.55, "bees": 0.45}),
                   Prediction("c.png", None, None, {}, "cannot identify image file")]
    assert summary(predictions) == {"images": 3, "classes": {"ants": 1, "bees": 0},
                                    "unknown": 1, "unreadable": 1}
    assert summary([]) == {"images": 0, "classes": {}, "unknown": 0, "unreadable": 0}


def test_an_exported_graph_predicts_as_the_module_it_was_traced_from(tmp_path: Path) -> None:
    """MLflow's pt2 models load as a torch.export graph, which refuses eval()."""
    root = make_image_folder(tmp_path / "d", per_class=3)
    pred = predictor(preprocessing())
    example = pred.prepare(image_files(root)[:2])
    batch = torch.export.Dim("batch", min=1)
    graph = torch.export.export(pred.model, (example,), dynamic_shapes=({0: batch},)).module()
    exported = Predictor(graph, pred.preprocessing)
    np.testing.assert_allclose(exported.probabilities(image_files(root), batch_size=4),
                               pred.probabilities(image_files(root)), atol=1e-6)


@pytest.mark.slow
def test_a_logged_trial_model_predicts_its_test_images_as_its_run_recorded(
        study_file: Path, store: Store, image_folder: Path, tmp_path: Path) -> None:
    """The weights a COMPLETE trial logged (runs:/ID/model) give the test-split probabilities
    its run recorded."""
    from mlflow import MlflowClient

    from hpo.after.models import resolve_model
    from hpo.config.study import load_study
    from hpo.search.run import run_search
    from hpo.tracking.client import Tracker

    result = run_search(load_study(str(study_file), {"trials": 1}), store)
    run_id = result.trials[0].run_id
    assert result.trials[0].state == "COMPLETE" and run_id is not None
    uri, pred = resolve_model(Tracker(store.tracking_uri), f"runs:/{run_id}/model")
    assert uri == f"runs:/{run_id}/model"
    logged = MlflowClient(store.tracking_uri).download_artifacts(
        run_id, "predictions_test.csv", str(tmp_path))
    with open(logged, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows

    classes = pred.preprocessing.classes
    files = [image_folder / r["file"] for r in rows]
    expected = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    predictions = pred.predict_files(files, batch_size=3)
    got = np.array([[p.probabilities[c] for c in classes] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert [p.prediction for p in predictions] == [r["prediction"] for r in rows]


def test_a_decision_threshold_decides_the_class_and_travels_with_the_metadata(
        tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=4)
    plain = predictor(preprocessing())
    p_bees = plain.probabilities(image_files(root))[:, 1]
    threshold = float(np.median(p_bees))  # half the images at or above it, whatever argmax says
    prep = dataclasses.replace(preprocessing(), decision_threshold=threshold)
    assert Preprocessing.from_metadata(json.loads(json.dumps(prep.to_metadata()))) == prep
    pred = predictor(prep)
    expected = [CLASSES[int(p >= threshold)] for p in p_bees]
    assert expected != [p.prediction for p in plain.predict_files([root])]  # not the argmax
    predictions = pred.predict_files([root])
    assert [p.prediction for p in predictions] == expected
    assert [p.probability for p in predictions] == pytest.approx(
        [p if c == "bees" else 1 - p for p, c in zip(p_bees, expected, strict=True)])
    with pytest.raises(ConfigError, match="decision threshold needs two classes, not 3"):
        dataclasses.replace(preprocessing(classes=("a", "b", "c")), decision_threshold=0.3)
