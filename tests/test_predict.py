"""`python -m tl_dist.predict`: a run's final model and one of its checkpoints, folders, bad files, --json.
The model comes from a real run of the entry point on the generated 4-class image tree."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import read_metrics, run_module, tiny_args
from tl_dist import predict


@pytest.fixture(scope="module")
def trained_run(image_tree, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("predict") / "run"
    proc = run_module(tiny_args(image_tree, out, cache_dir, "--wandb-mode", "disabled"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # after epoch 1 of 2, and after the last step (the state a longer run would continue from)
    checkpoint, last = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    assert int(last.name[5:]) == 2 * int(checkpoint.name[5:])
    return out, checkpoint


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_final_model_on_the_test_split_matches_the_run(trained_run, image_tree):
    """The run folder resolves to its final model; predict's top-1 on the run's test files gives the run's
    own test accuracy (same decoding, resizing and normalisation)."""
    out, _ = trained_run
    split = json.loads((out / "split.json").read_text())
    files = [str(image_tree / f) for f in split["test"]]
    proc = run_module(["--checkpoint", str(out), *files, "--json", "--top-k", "3"], module="tl_dist.predict")
    assert proc.returncode == 0, proc.stderr
    results = json_lines(proc.stdout)
    assert [r["file"] for r in results] == files
    classes = json.loads((out / "model" / "classes.json").read_text())
    correct = 0
    for r, rel in zip(results, split["test"]):
        probs = [t["probability"] for t in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(t["class"] in classes for t in r["top_k"])
        correct += r["top_k"][0]["class"] == rel.split("/")[0]
    assert correct / len(files) == pytest.approx(read_metrics(out)["test"]["accuracy"])
    assert "model" in proc.stderr and "4 classes" in proc.stderr


def test_checkpoint_folder_on_a_folder_with_bad_files(trained_run, image_tree, tmp_path, capsys):
    """A folder (searched recursively) holding good images, a zero-byte .jpg and a text file named .jpg:
    every good image is predicted, each bad one gets its own error, the exit status says some failed."""
    _, checkpoint = trained_run
    folder = tmp_path / "inbox"
    shutil.copytree(image_tree / "class_01", folder / "nested")
    good = sorted(p.name for p in (folder / "nested").iterdir())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image at all\n")
    (folder / ".hidden.jpg").write_text("hidden files are left out, as in training\n")

    assert predict.main(["--checkpoint", str(checkpoint), str(folder), "--json", "--batch-size", "3",
                         "--top-k", "10", "--device", "cpu"]) == 1
    results = {r["file"].replace(str(folder) + "/", ""): r for r in json_lines(capsys.readouterr().out)}
    assert sorted(results) == sorted(["empty.jpg", "notes.jpg", *(f"nested/{g}" for g in good)])
    assert "empty" in results["empty.jpg"]["error"] and "top_k" not in results["empty.jpg"]
    assert "cannot be read as an image" in results["notes.jpg"]["error"]
    for name in good:
        top = results[f"nested/{name}"]["top_k"]
        assert len(top) == 4  # --top-k 10 is capped at the 4 classes
        assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)

    # Plain output: top-k lines per image on stdout, one error line per bad file on stderr.
    assert predict.main(["--checkpoint", str(checkpoint), str(folder / "notes.jpg"), str(folder / "nested"),
                         str(tmp_path / "missing.png"), "--top-k", "2"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("  1. ") == len(good) and captured.out.count("  2. ") == len(good)
    assert "class_0" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "notes.jpg" in errors[0] and "missing.png: no such file" in errors[1]


def test_the_final_model_and_a_checkpoint_differ_and_bad_dirs_are_refused(trained_run, image_tree, tmp_path,
                                                                           capsys):
    out, checkpoint = trained_run
    image = str(sorted((image_tree / "class_02").iterdir())[0])
    probabilities = []
    for folder in (out / "model", checkpoint):
        assert predict.main(["--checkpoint", str(folder), image, "--json"]) == 0
        (line,) = json_lines(capsys.readouterr().out)
        probabilities.append([t["probability"] for t in line["top_k"]])
    assert probabilities[0] != probabilities[1]  # epoch 2's weights, then epoch 1's

    with pytest.raises(SystemExit) as exc:
        predict.main(["--checkpoint", str(tmp_path), image])
    assert exc.value.code == 2 and "no model here" in capsys.readouterr().err


def test_load_model_reads_run_folders_written_before_networks_were_recorded(trained_run, image_tree, tmp_path):
    """A config.json without mean/std (runs before other backbones: ImageNet's), and a model/ folder copied
    out of its run without any config.json (VGG16 or vgg_tiny, told apart by its weights): both give the
    run's own predictions."""
    import tl_dist

    out, _ = trained_run
    files = sorted((image_tree / "class_02").iterdir())[:4]
    expected = tl_dist.load_model(out).predict(files)
    assert tl_dist.load_model(out).arch == "vgg_tiny"

    old = tmp_path / "old_run" / "model"
    shutil.copytree(out / "model", old)
    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in ("mean", "std")}))
    (old / "manifest.json").unlink()  # those runs had no checksums either
    loaded = tl_dist.load_model(old.parent)
    assert (loaded.mean, loaded.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert torch.equal(loaded.predict(files), expected)

    (old / "config.json").unlink()
    bare = tl_dist.load_model(old)
    assert bare.arch == "vgg_tiny" and bare.config == {} and bare.image_size == 224
    bare.image_size = 32  # what predict's --image-size gives it
    assert torch.equal(bare.predict(files), expected)
