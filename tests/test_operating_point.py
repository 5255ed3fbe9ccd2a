"""An operating point and temperature scaling end to end: chosen on validation by a real
search, logged with the trial, carried by the promoted model, and used alike by `predict` and
the served pyfunc."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hpo.after.models import resolve_model
from hpo.after.promote import promote
from hpo.after.table import trials_table
from hpo.config.store import Store
from hpo.config.study import StudyError, load_study
from hpo.search.run import run_search
from hpo.tracking.client import Tracker, fluent_tracking_uri
from hpo.tracking.records import load_record
from imgcls.errors import ConfigError
from imgcls.predict import image_files
from tests.conftest import TINY_STUDY, make_image_folder, stripes


def imbalanced_folder(root: Path, healthy: int = 36, tb: int = 12) -> Path:
    """Two classes at 3:1, as a screening set is: healthy (row stripes) and tb (columns)."""
    rng = np.random.default_rng(0)
    for name, kind, count in (("healthy", "rows", healthy), ("tb", "columns", tb)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            gray = stripes(kind, 16, rng)
            Image.fromarray(np.stack([gray] * 3, axis=-1)).save(root / name / f"{i:03d}.png")
    return root


def test_a_sensitivity_target_travels_from_the_search_to_the_served_model(
        tmp_path: Path, store: Store) -> None:
    images = imbalanced_folder(tmp_path / "data")
    (tmp_path / "tiny.yaml").write_text(TINY_STUDY.format(data=images, trials=1))
    spec = load_study(str(tmp_path / "tiny.yaml"), {"operating_point": "sens=0.95"})
    assert spec.operating_point == "sens=0.95"
    result = run_search(spec, store)
    assert [t.state for t in result.trials] == ["COMPLETE"]

    tracker = Tracker(f"sqlite:///{store.root / 'mlflow.db'}", store.artifact_root)
    record = load_record(tracker, "tiny")
    metrics = record.trials[0].metrics
    threshold = metrics["threshold"]
    assert 0 < threshold <= 1
    for name in ("test_sens", "test_spec", "test_bal_acc", "test_auc"):
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"]
    assert trials_table(record).rows[0].threshold == threshold
    temperature = metrics["temperature"]
    for split in ("val", "test"):  # calibration before and after scaling, on both splits
        assert {f"{split}_ece", f"{split}_ece_uncalibrated", f"{split}_brier",
                f"{split}_brier_uncalibrated"} <= set(metrics)
    run_id = record.trials[0].run_id
    assert "reliability_test.png" in {a.path for a in tracker.client.list_artifacts(run_id)}

    promotion = promote(tracker, record)
    _, predictor = resolve_model(tracker, promotion.uri)
    assert predictor.preprocessing.decision_threshold == pytest.approx(threshold)
    assert predictor.preprocessing.temperature == pytest.approx(temperature)
    files = image_files(images)
    predicted = predictor.predict_files(files)
    p_tb = predictor.probabilities(files)[:, 1]
    assert [p.prediction for p in predicted] == \
        ["tb" if p >= threshold else "healthy" for p in p_tb]
    with fluent_tracking_uri(tracker.uri):
        served = mlflow.pyfunc.load_model(promotion.uri)
    out = served.predict(pd.DataFrame({"image": [str(f) for f in files]}))
    assert list(out["class"]) == [p.prediction for p in predicted]
    np.testing.assert_allclose(out["probability"], [p.probability for p in predicted],
                               rtol=1e-5)
    np.testing.assert_allclose(out["p_tb"], p_tb, rtol=1e-5)


def test_a_threshold_operating_point_is_refused_for_three_classes(
        tmp_path: Path, store: Store) -> None:
    images = make_image_folder(tmp_path / "data", classes=("a", "b", "c"))
    (tmp_path / "tiny.yaml").write_text(TINY_STUDY.format(data=images, trials=1))
    spec = load_study(str(tmp_path / "tiny.yaml"), {"operating_point": "youden"})
    with pytest.raises(ConfigError, match=r"operating point 'youden' needs two classes but "
                                          r"the data has 3; use argmax"):
        run_search(spec, store)
    with pytest.raises(StudyError, match=r"operating point 'sens=2': use argmax, youden"):
        load_study(str(tmp_path / "tiny.yaml"), {"operating_point": "sens=2"})
