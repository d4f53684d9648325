"""W&B as its users expect it, read back from real offline runs: the confusion matrix counts every test
image with 102 classes (conftest.caltech_like; wandb.plot.confusion_matrix's 102 x 102 rows pass
wandb.Table's 10,000-row limit), W&B's environment variables are honoured unless a flag says otherwise,
and --wandb-log-model logs the final model as an artifact with the test metrics."""

from __future__ import annotations

import base64
import csv
import hashlib
import json

import pytest

import wandb_reader
from conftest import launch, make_image_tree, read_metrics, tiny_args
from test_metrics import check_against_logits
from tl_dist import report as rpt

TEST_IMAGES = 179  # 2 of each class of 8 to 10 images, 1 of each class of 7
ENV = {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-entity", "WANDB_NAME": "env-name",
       "WANDB_RUN_GROUP": "env-group", "WANDB_TAGS": "env-a, env-b"}


@pytest.fixture(scope="module")
def sample_run(caltech_like, tmp_path_factory, cache_dir):
    """102 classes (179 test images), one epoch of the small network; W&B settings from the environment
    only; the model logged."""
    out = tmp_path_factory.mktemp("wandb-102") / "run"
    launch(tiny_args(caltech_like, out, cache_dir, "--epochs", "1", "--batch-size", "32", "--lr", "0.05",
                     "--wandb-log-model"), env=ENV)
    (run,) = wandb_reader.run_dirs(out / "wandb")
    return out, run


def run_record(run):
    return next(r.run for r in wandb_reader.records(run) if r.WhichOneof("record_type") == "run")


def model_artifacts(run) -> list:
    """The artifact records of type model (W&B also writes run_table artifacts for the tables)."""
    return [r.artifact for r in wandb_reader.records(run)
            if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]


def test_confusion_matrix_counts_every_test_image(sample_run):
    out, run = sample_run
    test_files = json.loads((out / "split.json").read_text())["test"]
    assert len(test_files) == TEST_IMAGES and read_metrics(out)["test"]["num_samples"] == TEST_IMAGES
    (row,) = [r for r in wandb_reader.history(run) if "finetuned/confusion_matrix_table/path" in r]
    table = json.loads((run / "files" / row["finetuned/confusion_matrix_table/path"]).read_text())
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert sum(count for _, _, count in table["data"]) == TEST_IMAGES
    assert all(count > 0 for _, _, count in table["data"]) and len(table["data"]) == row[
        "finetuned/confusion_matrix_table/nrows"] < TEST_IMAGES
    # Cell by cell the same as the run's full confusion_matrix.csv.
    with open(out / rpt.CONFUSION_CSV, newline="") as f:
        header, *lines = list(csv.reader(f))
    classes = header[1:]
    assert len(classes) == 102
    cells = {(line[0], classes[j]): int(v) for line in lines for j, v in enumerate(line[1:]) if int(v)}
    assert {(a, p): n for a, p, n in table["data"]} == cells
    # W&B draws it with its own confusion-matrix chart.
    chart = wandb_reader.config(run)["_wandb/visualize/finetuned/confusion_matrix"]  # nested keys joined by /
    assert chart["panel_config"]["panelDefId"] == rpt.WANDB_CONFUSION_PRESET
    assert chart["panel_config"]["fieldSettings"] == {c: c for c in table["columns"]}


def test_wandb_settings_come_from_the_environment(sample_run):
    _, run = sample_run
    record = run_record(run)
    assert (record.project, record.entity, record.display_name, record.run_group) == \
           ("env-project", "env-entity", "env-name", "env-group")
    assert list(record.tags) == ["env-a", "env-b"]


def test_flags_win_over_the_environment(tmp_path, cache_dir):
    data = make_image_tree(tmp_path / "data", classes=3, per_class=6)
    out = tmp_path / "run"
    launch(tiny_args(data, out, cache_dir, "--epochs", "1", "--wandb-project", "flag-project", "--wandb-entity",
                     "flag-entity", "--wandb-run-name", "flag-name", "--wandb-group", "flag-group",
                     "--wandb-tags", "flag-a,flag-b,flag-c"), env=ENV)
    (run,) = wandb_reader.run_dirs(out / "wandb")
    record = run_record(run)
    assert (record.project, record.entity, record.display_name, record.run_group) == \
           ("flag-project", "flag-entity", "flag-name", "flag-group")
    assert list(record.tags) == ["flag-a", "flag-b", "flag-c"]
    assert model_artifacts(run) == []  # --wandb-log-model is off by default

    # Neither flags nor environment: our project, the run folder's name, no group or tags.
    out2 = tmp_path / "run2"
    launch(tiny_args(data, out2, cache_dir, "--epochs", "1"))
    record = run_record(wandb_reader.run_dirs(out2 / "wandb")[0])
    assert (record.project, record.display_name, record.run_group, list(record.tags)) == \
           ("transfer_learn_pytorch", "run2", "", [])


def test_log_model_logs_the_final_model_with_its_test_metrics(sample_run):
    out, run = sample_run
    (model,) = model_artifacts(run)
    assert model.name == f"model-{wandb_reader.run_id(run)}" and set(model.aliases) >= {"latest", "final"}
    test = read_metrics(out)["test"]
    metadata = json.loads(model.metadata)["test"]
    assert metadata == {k: v for k, v in test.items() if isinstance(v, (int, float))}
    assert metadata["num_samples"] == TEST_IMAGES and "accuracy" in metadata and "top5_accuracy" in metadata
    # Every file of model/, byte for byte (W&B's manifest holds each file's base64 MD5).
    files = {p.name: p for p in (out / "model").iterdir()}
    entries = {e.path: e for e in model.manifest.contents}
    assert set(entries) == set(files) and "model.safetensors" in entries
    for name, path in files.items():
        assert entries[name].digest == base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()
        assert entries[name].size == path.stat().st_size


def test_metrics_of_102_classes_match_an_independent_computation(sample_run, caltech_like):
    out, _ = sample_run
    expected = check_against_logits(out, caltech_like)
    assert len(expected["per_class"]) == 102 and 0 < expected["accuracy"] < expected["top5_accuracy"] < 1
