"""The whole flow on tiny data, through the command line: search -> results -> promote ->
predict -> explain, against one store."""

import csv
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from hpo.cli import app

pytestmark = pytest.mark.slow
runner = CliRunner()


def _ok(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_search_results_promote_predict_explain(study_file: Path, image_folder: Path,
                                                tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    _ok("search", str(study_file), "--trials", "3", "--store", store)

    # results: the table, the 3D plot (HTML and PNG) holding every finished trial, Optuna's views
    out = _ok("results", "tiny", "--store", store)
    assert "best 3 finished trials by val_f1" in out
    results = tmp_path / "store" / "results" / "tiny"
    html = (results / "hparams_3d.html").read_text()
    assert (results / "hparams_3d.png").stat().st_size > 10_000
    with (results / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    assert len(trials) == 3
    for trial in trials:  # every finished trial is a point of the plot, named in its hover text
        assert f"trial {trial['number']}" in html

    # promote: the alias points at the best trial's model
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    out = _ok("promote", "tiny", "--store", store)
    assert "models:/tiny-classifier@champion" in out
    best = max(trials, key=lambda t: float(t["best_val_f1"] or "nan"))
    champion = client.get_model_version_by_alias("tiny-classifier", "champion")
    assert champion.run_id == best["run_id"]

    # promoting another trial moves the alias and keeps the old version as @previous
    other = next(t for t in trials if t["run_id"] != best["run_id"] and t["state"] == "COMPLETE")
    _ok("promote", "tiny", "--run-id", other["run_id"], "--store", store)
    assert client.get_model_version_by_alias("tiny-classifier", "champion").run_id == \
        other["run_id"]
    assert client.get_model_version_by_alias("tiny-classifier", "previous").version == \
        champion.version

    # predict: a row per image, probabilities summing to 1; a corrupt file is reported, not fatal
    (image_folder / "bees" / "broken.png").write_bytes(b"not a png")
    predictions = tmp_path / "predictions.csv"
    out = _ok("predict", "tiny", str(image_folder), "--out", str(predictions), "--store", store)
    assert "21 images" in out and "1 unreadable" in out
    with predictions.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 21
    read = [r for r in rows if not r["error"]]
    assert len(read) == 20
    for row in read:
        assert float(row["p_ants"]) + float(row["p_bees"]) == pytest.approx(1, abs=1e-5)
    broken = next(r for r in rows if r["file"].endswith("broken.png"))
    assert broken["error"] and not broken["prediction"]

    # a threshold above every probability makes every readable image unknown
    _ok("predict", "models:/tiny-classifier@champion", str(image_folder), "--threshold", "1",
        "--out", str(predictions), "--store", store)
    with predictions.open() as f:
        assert {r["prediction"] for r in csv.DictReader(f) if not r["error"]} == {"unknown"}

    # uncertainty: MC-dropout (the tiny study searches dropout > 0) and the flips it trained
    # with give an entropy and rank per image, the same for the same seed
    runs = []
    for seed in ("3", "3", "4"):
        out = _ok("predict", "tiny", str(image_folder), "--mc-dropout", "5", "--tta",
                  "--seed", seed, "--out", str(predictions), "--store", store)
        assert "entropy mean" in out
        with predictions.open() as f:
            runs.append([r for r in csv.DictReader(f) if not r["error"]])
    assert runs[0] == runs[1] and runs[0] != runs[2]
    assert sorted(int(r["entropy_rank"]) for r in runs[0]) == list(range(1, 21))
    assert all(0 <= float(r["entropy"]) <= 0.6932 for r in runs[0])

    # explain: one Grad-CAM overlay per readable image, and the t-SNE map with --embed
    overlays = tmp_path / "explain"
    _ok("explain", "tiny", str(image_folder), "--out", str(overlays), "--embed",
        "--store", store)
    assert len(list(overlays.glob("*.png"))) == 20 + 1
    assert (overlays / "tsne.png").exists()
