"""Issue 3: the same training on one process or many. Real `accelerate launch` runs of tl_dist/train.py with
1, 2 and 3 CPU processes (gloo) on a generated tree of 4 classes x 18 images at 32 px, split 32 train /
40 test (--test-fraction 0.55). 40 is divisible neither by 3 processes nor by the evaluation batch of 3.

Each run is launched once per module (the independent ones at the same time) and shared by the tests:
  one_step[1], one_step[2]  one SGD step over the 32 training images, as 1 x 32 and as 2 x 16
  three                     3 processes, 2 epochs of 3 steps, started in an empty folder with the default
                            --data-dir (which a stand-in Kaggle client "downloads") and no --output-dir,
                            the processes' clocks an hour apart
  evals[n]                  --eval-only --resume auto on copies of `three`'s folder, n = 1, 2, 3 processes
and one by its own test: VGG16 with stand-in ImageNet weights on 2 processes.
The multi-process runs get tests/distributed_fakes/ on their PYTHONPATH: a Python audit hook there records
what each process writes, and stand-ins replace the network (see its sitecustomize.py).

The expected numbers come from replaying the training in this process with plain torch: the processes'
shards from tl_dist.data.GlobalBatchSampler (whose properties tests/test_sampler.py checks), their losses
averaged as DDP averages gradients, SGD with momentum from the run's own checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import wandb_reader
from conftest import REPO, launch, make_image_tree, read_metrics
from tl_dist.checkpoint import load_weights
from tl_dist.data import GlobalBatchSampler, load_image, normalize
from tl_dist.model import build_model, trainable_parameters

pytestmark = pytest.mark.slow  # several processes (see pyproject.toml's markers)

FAKES = Path(__file__).parent / "distributed_fakes"
N_TRAIN, N_TEST, IMAGE_SIZE, SEED, LR, MOMENTUM = 32, 40, 32, 0, 0.05, 0.9
ABORT_SIGNS = ("terminate called", "Aborted", "SIGABRT", "core dumped", "Traceback", "NOT been destroyed",
               "Signal 6")
FINAL_TABLE = "Test split: before vs after fine-tuning"
METRICS = ("loss", "accuracy", "top5_accuracy", "precision_macro", "recall_macro", "f1_macro",
           "mean_class_accuracy")


@dataclass
class Run:
    nproc: int
    proc: subprocess.CompletedProcess
    dir: Path | None  # the run folder (None when the run did not make exactly one)
    audit: Path | None = None  # audit-<rank>.log files, for runs launched with the audit hook


def args(cache: Path, *extra: str) -> list[str]:
    return ["--cache-dir", str(cache), "--model", "vgg_tiny", "--weights", "none", "--image-size",
            str(IMAGE_SIZE), "--test-fraction", "0.55", "--dropout", "0", "--lr", str(LR), "--momentum",
            str(MOMENTUM), "--seed", str(SEED), "--log-every", "1", "--wandb-mode", "offline", *extra]


def fakes_env(audit_dir: Path, audit_root: Path, **extra: str) -> dict:
    audit_dir.mkdir(parents=True, exist_ok=True)
    return {"PYTHONPATH": f"{FAKES}{os.pathsep}{REPO}", "TL_DIST_TEST_AUDIT": str(audit_dir),
            "TL_DIST_TEST_AUDIT_ROOT": str(audit_root), **extra}


def assert_ran(run: Run) -> None:
    out, err = run.proc.stdout[-5000:], run.proc.stderr[-8000:]
    assert run.proc.returncode == 0, f"exit code {run.proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"


# ---------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def tree(root) -> Path:
    return make_image_tree(root / "images" / "caltech-101", classes=4, per_class=18)


def launch_together(jobs: dict) -> dict:
    """Launch independent runs at the same time ({key: launch kwargs} -> {key: CompletedProcess}): much of
    a run is start-up, waiting and W&B's service, so together they keep the cores busier."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {key: pool.submit(launch, check=False, **kw) for key, kw in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def trained(root, tree) -> dict:
    """The training runs, launched together:

    one_step_1, one_step_2: the same 32 images in one step, one process with a batch of 32 and two with 16
    each (one batch per process and epoch: ceil(32 / 2) = 16).
    three: 3 processes from an empty folder, with the default --data-dir (./data/caltech-101, missing, so
    the main process downloads it from the stand-in Kaggle) and the default --output-dir (runs/<date-time>),
    process r's clock r hours ahead; 2 epochs, 32 images in global batches of 12, 12 and 8 (3, 3 and 2 per
    process in the last), so 3 steps per epoch."""
    jobs, dirs, audits = {}, {}, {}
    for nproc, batch in ((1, 32), (2, 16)):
        key = f"one_step_{nproc}"
        dirs[key] = root / key
        env = fakes_env(root / f"audit_{key}", dirs[key]) if nproc > 1 else None
        audits[key] = env and Path(env["TL_DIST_TEST_AUDIT"])
        jobs[key] = dict(args=args(root / f"cache_{key}", "--data-dir", str(tree), "--output-dir",
                                   str(dirs[key]), "--batch-size", str(batch), "--epochs", "1"),
                         nproc=nproc, env=env)
    cwd = root / "three_cwd"
    cwd.mkdir()
    env = fakes_env(root / "audit_three", cwd, TL_DIST_TEST_SKEW_CLOCKS="1",
                    TL_DIST_TEST_FAKE_KAGGLE=str(root / "kaggle.log"), TL_DIST_TEST_KAGGLE_SOURCE=str(tree))
    audits["three"] = Path(env["TL_DIST_TEST_AUDIT"])
    jobs["three"] = dict(args=args(root / "cache_three", "--batch-size", "4", "--epochs", "2"), nproc=3,
                         env=env, cwd=cwd)
    procs = launch_together(jobs)
    made = sorted((cwd / "runs").iterdir()) if (cwd / "runs").is_dir() else []
    dirs["three"] = made[0] if len(made) == 1 else None
    return {key: Run(jobs[key]["nproc"], procs[key], dirs[key], audits[key]) for key in jobs}


@pytest.fixture(scope="module")
def one_step(trained) -> dict[int, Run]:
    return {1: trained["one_step_1"], 2: trained["one_step_2"]}


@pytest.fixture(scope="module")
def three(trained) -> Run:
    return trained["three"]


@pytest.fixture(scope="module")
def three_data(root) -> Path:
    return root / "three_cwd" / "data" / "caltech-101"


@pytest.fixture(scope="module")
def evals(root, three, three_data) -> dict[int, Run]:
    """--eval-only --resume auto with 1, 2 and 3 processes (launched together), each on its own copy of
    `three`'s folder, with an evaluation batch of 3: 14 batches on 1 process, 7 x 6 on 2 (the last 4 real),
    5 x 9 on 3 (the last 4 real)."""
    assert_ran(three)
    jobs = {}
    for nproc in (1, 2, 3):
        copy = root / f"eval_{nproc}"
        shutil.copytree(three.dir, copy, symlinks=True)
        jobs[nproc] = dict(args=args(root / "cache_three", "--data-dir", str(three_data), "--output-dir",
                                     str(copy), "--resume", "auto", "--eval-only", "--batch-size", "3"),
                           nproc=nproc, env=fakes_env(root / f"audit_eval_{nproc}", copy))
    procs = launch_together(jobs)
    return {nproc: Run(nproc, procs[nproc], root / f"eval_{nproc}", root / f"audit_eval_{nproc}")
            for nproc in jobs}


# ---------------------------------------------------------------- reading runs, replaying them


def split_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "split.json").read_text())


def label_of(split: dict, file: str) -> int:
    return split["classes"].index(file.split("/", 1)[0])


def images_of(data_dir: Path, files: list[str]) -> torch.Tensor:
    """uint8 N x 3 x S x S, decoded here (not read from the run's cache)."""
    pixels = np.stack([load_image(data_dir / f, IMAGE_SIZE) for f in files])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def network(weights: Path):
    model = build_model("vgg_tiny", 4, "none", "features", dropout=0.0)
    load_weights(model, weights)
    return model


def wandb_run(run_dir: Path) -> Path:
    dirs = wandb_reader.run_dirs(run_dir / "wandb")
    assert len(dirs) == 1, f"expected one W&B run in {run_dir / 'wandb'}, found {[d.name for d in dirs]}"
    return dirs[0]


def logged(run_dir: Path, key: str) -> dict[int, object]:
    return {row["_step"]: row[key] for row in wandb_reader.history(wandb_run(run_dir)) if key in row}


def replay_epoch(run_dir: Path, data_dir: Path, checkpoint_step: int, epoch: int, world: int, batch: int,
                 order_epoch: int | None = None) -> dict:
    """Train one epoch from the run's checkpoint in this process, as `world` DDP processes would: process
    r's batches from GlobalBatchSampler(rank=r), the loss of a step is the mean of the processes' weighted
    batch means, and its gradient is the processes' gradients averaged. Returns the step losses, each process'
    own share of them, and the weights after the epoch. `order_epoch` deals the samples of another epoch
    (a control: the run must not match it)."""
    ckpt = run_dir / "checkpoints" / f"step_{checkpoint_step}"
    split = split_of(run_dir)
    model = network(ckpt)
    optimizer = torch.optim.SGD(trainable_parameters(model), lr=LR, momentum=MOMENTUM)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.bin", weights_only=True))
    with torch.no_grad():
        features = model.embed(normalize(images_of(data_dir, split["train"])))
    labels = torch.tensor([label_of(split, f) for f in split["train"]])
    samplers = [GlobalBatchSampler(len(labels), batch, world, rank, SEED) for rank in range(world)]
    for sampler in samplers:
        sampler.set_epoch(epoch if order_epoch is None else order_epoch)
    model.train()
    losses, shares = [], []
    for batches in zip(*samplers):
        # each process' mean weighted by its share of the global batch (exactly 1 when the batch is full):
        # the mean over the global batch, as DDP's gradient average gives it
        n = sum(len(b) for b in batches)
        per_process = [F.cross_entropy(model(features[b], pooled=True), labels[b]) * (len(b) * world / n)
                       for b in batches]
        loss = torch.stack(per_process).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        shares.append([x.item() for x in per_process])
    return {"losses": losses, "shares": shares, "weights": model.state_dict()}


@pytest.fixture(scope="module")
def replay(three, three_data) -> dict:
    """`three`'s second epoch (global steps 4-6) replayed from its checkpoint at step 3."""
    assert_ran(three)
    return replay_epoch(three.dir, three_data, checkpoint_step=3, epoch=1, world=3, batch=4)


# ---------------------------------------------------------------- 1. sharding


def test_processes_train_on_their_shards_reshuffled_each_epoch(three, three_data, replay):
    """The real processes train on GlobalBatchSampler's shards, dealt anew in epoch 2: the run's losses
    and final weights are the replay's, and not those of epoch 1's order repeated."""
    state = json.loads((three.dir / "checkpoints" / "step_3" / "train_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 0, 3)
    losses = logged(three.dir, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([losses[s] for s in (4, 5, 6)], replay["losses"], rtol=1e-5)
    final = load_file(str(three.dir / "model" / "model.safetensors"))
    for name, value in replay["weights"].items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6, msg=f"final weights: {name}")

    same_order = replay_epoch(three.dir, three_data, checkpoint_step=3, epoch=1, world=3, batch=4,
                              order_epoch=0)
    assert not np.allclose(same_order["losses"], replay["losses"], rtol=1e-3), \
        "control: epoch 1's order must give other losses, or this test could not tell reshuffling apart"


# ---------------------------------------------------------------- 2. exact evaluation


def test_eval_only_is_exact_whatever_the_number_of_processes(three, three_data, evals):
    split = split_of(three.dir)
    assert len(split["test"]) == N_TEST and N_TEST % 3 and N_TEST % 9 and N_TEST % 6

    # the truth, computed here in one piece from the final weights
    with torch.no_grad():
        logits = network(three.dir / "model")(normalize(images_of(three_data, split["test"])))
    labels = torch.tensor([label_of(split, f) for f in split["test"]])
    expected = {"loss": F.cross_entropy(logits, labels).item(),
                "accuracy": (logits.argmax(1) == labels).double().mean().item()}

    trained = read_metrics(three.dir)["test"]  # 3 processes, batch 4, evaluated during the training run
    for nproc, run in evals.items():
        assert_ran(run)
        metrics = read_metrics(run.dir / "eval" / "model")  # --eval-only writes there, not over the run
        assert metrics["eval_only"]["num_processes"] == nproc
        test = metrics["test"]
        assert test["num_samples"] == N_TEST, f"{nproc} processes counted {test['num_samples']} test images"
        assert test["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert test["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
        for key in METRICS:
            assert test[key] == pytest.approx(trained[key], rel=1e-5, abs=1e-9), f"{key}, {nproc} processes"
        assert test["per_class_accuracy"] == pytest.approx(trained["per_class_accuracy"], abs=1e-12)


# ---------------------------------------------------------------- 3. gradients are averaged


def test_one_step_on_two_processes_equals_one_step_on_one(one_step):
    # the two runs see the same 32 images in their one step
    assert flat_epoch(N_TRAIN, 32, 1) == list(range(N_TRAIN))
    assert flat_epoch(N_TRAIN, 16, 2) == list(range(N_TRAIN))
    for run in one_step.values():
        assert_ran(run)
        assert read_metrics(run.dir)["train"]["global_step"] == 1
        assert read_metrics(run.dir)["train"]["num_processes"] == run.nproc
        assert len(split_of(run.dir)["train"]) == N_TRAIN

    one = load_file(str(one_step[1].dir / "model" / "model.safetensors"))
    two = load_file(str(one_step[2].dir / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=f"weights: {name}")
    # and the step did move the weights well beyond that tolerance (an untrained head tests nothing)
    before, after = (read_metrics(one_step[1].dir)[k]["loss"] for k in ("baseline", "test"))
    assert abs(after - before) > 1e-3


def flat_epoch(size: int, batch: int, world: int) -> list[int]:
    """The sorted samples of epoch 0's first step over all processes."""
    firsts = []
    for rank in range(world):
        sampler = GlobalBatchSampler(size, batch, world, rank, SEED)
        sampler.set_epoch(0)
        firsts += next(iter(sampler))
    return sorted(firsts)


# ---------------------------------------------------------------- 4. the logged loss


def test_logged_loss_is_the_mean_over_all_processes(one_step, three, replay):
    # 2 x 16: the mean of the two processes' means is the mean over the 32 images, which 1 x 32 logged
    for run in one_step.values():
        assert_ran(run)
    single, double = logged(one_step[1].dir, "train/loss"), logged(one_step[2].dir, "train/loss")
    assert list(single) == list(double) == [1]
    assert double[1] == pytest.approx(single[1], rel=1e-5)

    # 3 processes: each step's logged loss is the mean of the three processes' losses replayed here, not
    # the main process' own share
    losses = logged(three.dir, "train/loss")
    for step, loss, shares in zip((4, 5, 6), replay["losses"], replay["shares"]):
        assert losses[step] == pytest.approx(loss, rel=1e-5)
        assert losses[step] == pytest.approx(sum(shares) / 3, rel=1e-5)
        assert shares[0] != pytest.approx(loss, rel=1e-3), "control: process 0's share differs from the mean"
    epoch_losses = logged(three.dir, "train/epoch_loss")
    assert epoch_losses[6] == pytest.approx(np.mean([losses[s] for s in (4, 5, 6)]), rel=1e-6)
    assert read_metrics(three.dir)["train"]["epoch_loss"][1] == pytest.approx(epoch_losses[6], rel=1e-6)


# ---------------------------------------------------------------- 5. the main process logs, writes, downloads


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_one_wandb_run_and_one_printout_per_training_run(nproc, one_step, three):
    run = three if nproc == 3 else one_step[nproc]
    assert_ran(run)
    offline = wandb_run(run.dir)  # exactly one
    assert wandb_reader.run_id(offline) == (run.dir / "wandb_run_id").read_text().strip()
    assert wandb_reader.config(offline)["num_processes"] == nproc
    assert not list(REPO.glob(f"wandb/*{wandb_reader.run_id(offline)}*")), "a W&B run outside the run folder"
    # the main process prints; the others stay quiet
    out = run.proc.stdout
    assert out.count(FINAL_TABLE) == 1, out[-3000:]
    assert out.count("baseline: test loss") == 1
    assert out.count("epoch 1: mean train loss") == 1


@pytest.mark.parametrize("nproc", [2, 3])
def test_only_the_main_process_writes_to_the_run_folder(nproc, one_step, three):
    """What the audit hook saw each process write under the run's folder (Python-level I/O: json files,
    renames, removals; not the tensors torch and safetensors write from C++/Rust)."""
    run = three if nproc == 3 else one_step[nproc]
    assert_ran(run)
    events = {rank: (run.audit / f"audit-{rank}.log").read_text().splitlines() for rank in range(nproc)}
    main = "\n".join(events[0])
    for name in ("metrics.json", "split.json", "config.json", "train_state.json", "classes.json",
                 "wandb_run_id"):
        assert name in main, f"the main process did not write {name}"
    made_by_main = {e for e in events[0] if e.startswith("os.mkdir\t")}
    for rank in range(1, nproc):
        wrote = [e for e in events[rank] if not (e in made_by_main or removes_stop_file(e))]
        assert not wrote, f"process {rank} wrote to the run folder:\n" + "\n".join(wrote)


def removes_stop_file(event: str) -> bool:
    """Harmless: StopRequest.uninstall removes a STOP file on every process (missing_ok). (The other
    processes' other harmless event, makedirs(exist_ok=True) in Accelerate's save_state on a folder the main
    process made, is let through above.)"""
    kind, path = event.split("\t", 1)
    return kind == "os.remove" and Path(path).name == "STOP"


def test_default_output_dir_is_chosen_once_and_shared(root, three):
    """No --output-dir: the main process picks runs/<date-time> and the others use it, although their
    clocks are an hour apart. Every process saved its RNG state into that one folder's checkpoint."""
    assert_ran(three)
    made = sorted(p.name for p in (root / "three_cwd" / "runs").iterdir())
    assert len(made) == 1 and three.dir is not None, f"expected one folder in runs/, found {made}"
    assert f"run folder runs/{three.dir.name}" in " ".join(three.proc.stdout.split())
    ckpt = three.dir / "checkpoints" / "step_3"
    states = sorted(p.name for p in ckpt.glob("random_states_*.pkl"))
    assert states == [f"random_states_{rank}.pkl" for rank in range(3)]


def test_data_is_downloaded_once_while_the_others_wait(root, three, three_data, tree):
    assert_ran(three)
    downloads = (root / "kaggle.log").read_text().splitlines()
    assert len(downloads) == 1 and downloads[0].startswith("rank 0 "), downloads
    assert sorted(p.name for p in three_data.iterdir()) == sorted(p.name for p in tree.iterdir())
    assert not [p.name for p in three_data.parent.iterdir() if p.name != "caltech-101"], "download leftovers"
    assert len(split_of(three.dir)["train"]) == N_TRAIN  # every process indexed the complete download


def test_imagenet_weights_are_downloaded_once_while_the_others_wait(root, tree):
    """--weights imagenet on 2 processes with an empty torch hub cache: the stand-in download (a tiny
    VGG16 state_dict, after a second's wait) must run once, on the main process; the other process waits
    for it and loads the cached file."""
    cwd, torch_home, log = root / "imagenet_cwd", root / "torch_home", root / "hub.log"
    cwd.mkdir()
    env = fakes_env(root / "audit_imagenet", cwd, TL_DIST_TEST_FAKE_HUB=str(log), TORCH_HOME=str(torch_home))
    proc = launch(["--data-dir", str(tree), "--output-dir", str(cwd / "run"), "--cache-dir",
                   str(root / "cache_imagenet"), "--model", "vgg16", "--weights", "imagenet", "--image-size",
                   "32", "--test-fraction", "0.55", "--batch-size", "4", "--epochs", "1", "--max-steps", "1",
                   "--wandb-mode", "disabled"], nproc=2, env=env, cwd=cwd, check=False)
    run = Run(2, proc, cwd / "run", root / "audit_imagenet")
    assert_ran(run)
    downloads = log.read_text().splitlines()
    assert len(downloads) == 1 and downloads[0].startswith("rank 0 "), downloads
    assert [p.name for p in (torch_home / "hub" / "checkpoints").iterdir()] == ["vgg16-397923af.pth"]
    assert read_metrics(run.dir)["test"]["num_samples"] == N_TEST
    assert_clean_exit(run)


# ---------------------------------------------------------------- 6. prediction grids


@pytest.mark.parametrize("nproc", [2, 3])
def test_prediction_grids_are_gathered_and_logged_once(nproc, one_step, three, three_data, tree):
    """The baseline's and the fine-tuned model's predictions on the first 32 test images, in split order:
    the images themselves, `pred: X / label: Y` captions with class names, the fine-tuned predictions those
    of the final model."""
    run = three if nproc == 3 else one_step[nproc]
    data_dir = three_data if nproc == 3 else tree
    assert_ran(run)
    offline = wandb_run(run.dir)
    rows = wandb_reader.history(offline)
    split = split_of(run.dir)
    first = split["test"][:32]
    pixels = images_of(data_dir, first)
    with torch.no_grad():
        final_preds = network(run.dir / "model")(normalize(pixels)).argmax(1).tolist()
    for prefix in ("baseline", "finetuned"):
        key = f"{prefix}/predictions"
        (row,) = [r for r in rows if f"{key}/captions" in r]
        assert row[f"{key}/count"] == 32
        captions, files = row[f"{key}/captions"], row[f"{key}/filenames"]
        assert len(captions) == len(files) == 32
        for i, (caption, file) in enumerate(zip(captions, files)):
            pred, label = caption.removeprefix("pred: ").split(" / label: ")
            assert caption.startswith("pred: ") and pred in split["classes"], caption
            assert label == first[i].split("/", 1)[0], f"{prefix} image {i}: {caption}, file {first[i]}"
            if prefix == "finetuned":
                assert pred == split["classes"][final_preds[i]], f"image {i}: {caption}"
            picture = np.asarray(Image.open(offline / "files" / file).convert("RGB"))
            assert np.array_equal(picture, pixels[i].permute(1, 2, 0).numpy()), f"{prefix} image {i}: {file}"
        assert {Path(f).parent for f in files} == {Path("media", "images", prefix)}


# ---------------------------------------------------------------- 7. clean shutdown


def assert_clean_exit(run: Run) -> None:
    """Exit code 0, no abort in the output, and every process had taken its process group down before it
    exited (that last check does not depend on whether a leftover group happens to abort this time)."""
    assert_ran(run)
    found = [sign for sign in ABORT_SIGNS if sign in run.proc.stderr or sign in run.proc.stdout]
    assert not found, f"{run.nproc} processes: {found} in the output\n{run.proc.stderr[-4000:]}"
    at_exit = {rank: (run.audit / f"exit-{rank}.log").read_text().strip() for rank in range(run.nproc)}
    assert at_exit == {rank: "process group destroyed" for rank in range(run.nproc)}


@pytest.mark.parametrize("which", ["train-2", "train-3", "eval-2", "eval-3"])
def test_several_processes_shut_down_cleanly(which, one_step, three, evals):
    kind, nproc = which.split("-")
    run = (one_step[2] if nproc == "2" else three) if kind == "train" else evals[int(nproc)]
    assert_clean_exit(run)
