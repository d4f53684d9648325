"""`python -m tl_dist.cache list / prune` on a cache folder made by real runs, with planted entries beside
them (a feature cache, old decoded-image caches, a writer's temporary file, arrays without a sidecar) whose
times are set back: what list shows, that a run reusing a cache marks its last use, and what prune removes
(least recently used first, never a running writer's temporary file, always one whose writer is gone,
never a fresh array without its sidecar)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_module, tiny_args, train_in_process
from tl_dist import cache as tl_cache
from tl_dist.cache_entry import sampled_sha256

DAY = 86400


def set_age(days: float, *paths) -> None:
    t = time.time() - days * DAY
    for p in paths:
        os.utime(p, (t, t))


def train(image_tree, tmp_path, cache, name: str, size: int, capsys) -> str:
    # image caches only (features on disk have their own entries and tests: tests/test_feature_store.py)
    args = tiny_args(image_tree, tmp_path / name, cache, "--image-size", str(size), "--max-steps", "1",
                     "--epochs", "1", "--wandb-mode", "disabled", "--checkpoint-every-epochs", "0",
                     "--cache-features", "off")
    code = train_in_process(args)
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-3000:]
    return out.out


def cache_cli(*args: str):
    proc = run_module(list(args), module="tl_dist.cache")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def cache_folder(image_tree, tmp_path, capsys):
    """Two decoded-image caches made by real runs (32 px, then 24 px), and planted beside them: a feature
    cache used 10 days ago, an image cache used 40 days ago, a temporary file of a writer 40 days old, an
    array without a sidecar 2 days old and one written just now."""
    cache = tmp_path / "cache"
    train(image_tree, tmp_path, cache, "run32", 32, capsys)
    train(image_tree, tmp_path, cache, "run24", 24, capsys)
    (img32,) = cache.glob("images-*-32px.npy")
    (img24,) = cache.glob("images-*-24px.npy")
    features = cache / "features-0123456789abcdef.npy"
    np.save(features, np.zeros((500, 256), dtype=np.float16))
    features.with_suffix(".json").write_text(json.dumps(
        {"kind": "features", "key": {"model": "vgg_tiny", "image_size": 32, "precision": "bf16"}, "rows": 500,
         "sampled_sha256": sampled_sha256(features)}))
    old_images = cache / "images-ffffffffffffffffffff-64px.npy"
    shutil.copy(img32, old_images)
    shutil.copy(img32.with_suffix(".json"), old_images.with_suffix(".json"))
    temp = cache / ".features-aaaa.1234-99.npy"  # no writer in its name: never removed
    temp.write_bytes(b"\0" * 100_000)
    # data.ImageCache's temp files, named after their writer: one that is gone, one that runs (this process)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead_temp = cache / f".images-dddddddddddddddddddd-32px.tmp-{host}-{int(gone.stdout)}.npy"
    live_temp = cache / f".images-cccccccccccccccccccc-32px.tmp-{host}-{os.getpid()}.npy"
    dead_temp.write_bytes(b"\0" * 30_000)
    live_temp.write_bytes(b"\0" * 10_000)
    orphan, fresh_orphan = cache / "images-eeeeeeeeeeeeeeeeeeee-48px.npy", cache / "features-bbbb.npy"
    orphan.write_bytes(b"\0" * 50_000)
    fresh_orphan.write_bytes(b"\0" * 20_000)
    set_age(10, features, features.with_suffix(".json"))
    set_age(40, old_images, old_images.with_suffix(".json"), temp)
    set_age(2, orphan)
    set_age(1, img32, img32.with_suffix(".json"))  # the 32 px run was yesterday; the 24 px one today
    set_age(0.5, dead_temp, live_temp)
    return dict(cache=cache, img32=img32, img24=img24, features=features, old_images=old_images, temp=temp,
                orphan=orphan, fresh_orphan=fresh_orphan, dead_temp=dead_temp, live_temp=live_temp)


def size_of(*arrays) -> int:
    return sum(p.stat().st_size + (p.with_suffix(".json").stat().st_size if p.with_suffix(".json").exists() else 0)
               for p in arrays)


def test_list_shows_every_entry_with_kind_key_size_and_last_use(cache_folder):
    c = cache_folder
    entries = {e.name: e for e in tl_cache.scan(c["cache"])}
    assert {name: e.kind for name, e in entries.items()} == {
        c["img32"].stem: "images", c["img24"].stem: "images", c["features"].stem: "features",
        c["old_images"].stem: "images", c["temp"].name: "temp", c["orphan"].stem: "incomplete",
        c["fresh_orphan"].stem: "incomplete", c["dead_temp"].name: "temp", c["live_temp"].name: "temp"}
    pid = c["dead_temp"].name.rsplit("-", 1)[1][:-4]
    assert entries[c["dead_temp"].name].key == f"writer pid {pid} on {socket.gethostname()}: gone"
    assert entries[c["live_temp"].name].key == f"writer pid {os.getpid()} on {socket.gethostname()}: running"
    assert entries[c["img32"].stem].size == size_of(c["img32"]) == 40 * 32 * 32 * 3 + 128 + \
        c["img32"].with_suffix(".json").stat().st_size
    assert entries[c["features"].stem].size == size_of(c["features"]) > 500 * 256 * 2
    assert entries[c["features"].stem].key == "model=vgg_tiny image_size=32 precision=bf16 rows=500"
    key32 = c["img32"].stem.split("-")[1]
    assert entries[c["img32"].stem].key == f"key={key32} image_size=32 files=40 undecodable=0"
    # Most recently used first.
    assert [e.name for e in tl_cache.scan(c["cache"])][:2] == [c["fresh_orphan"].stem, c["img24"].stem]

    out = cache_cli("list", "--cache-dir", str(c["cache"]))
    assert f"{c['cache']}: 9 entries" in out
    row = next(line for line in out.splitlines() if c["features"].stem in line)
    assert "features" in row and "rows=500" in row and f"{tl_cache._size(size_of(c['features']))} " in row and " 10 days ago" in row
    row = next(line for line in out.splitlines() if c["old_images"].stem in line)
    assert " 40 days ago" in row and "key=ffffffffffffffffffff image_size=32 files=40" in row


def test_a_run_that_reuses_an_image_cache_marks_its_last_use(cache_folder, image_tree, tmp_path, capsys):
    c = cache_folder
    sidecar = c["img32"].with_suffix(".json")
    assert time.time() - sidecar.stat().st_mtime > 0.9 * DAY
    printed = train(image_tree, tmp_path, c["cache"], "again32", 32, capsys)
    assert "decoding" not in printed  # reused, not rebuilt
    assert time.time() - sidecar.stat().st_mtime < 600
    assert tl_cache.scan(c["cache"])[0].name in (c["img32"].stem, c["fresh_orphan"].stem)


def test_prune_older_than_removes_old_entries_but_never_a_temporary_file(cache_folder):
    c = cache_folder
    freed = size_of(c["old_images"], c["features"]) + c["dead_temp"].stat().st_size
    total = sum(e.size for e in tl_cache.scan(c["cache"]))
    out = cache_cli("prune", "--cache-dir", str(c["cache"]), "--older-than", "5")
    removed = re.findall(r"^removed (\S+) (\S+) \(", out, flags=re.M)
    assert sorted(removed) == sorted([("images", c["old_images"].stem), ("features", c["features"].stem),
                                      ("temp", c["dead_temp"].name)])  # its writer is gone: always removed
    assert c["live_temp"].exists() and not c["dead_temp"].exists()
    assert not c["old_images"].exists() and not c["old_images"].with_suffix(".json").exists()
    assert not c["features"].exists() and not c["features"].with_suffix(".json").exists()
    assert c["temp"].exists() and c["orphan"].exists() and c["img32"].exists() and c["img24"].exists()
    assert f"removed 3 entries, {tl_cache._size(freed)} freed; {c['cache']} now holds " \
        f"{tl_cache._size(total - freed)}" in out, out


def test_prune_max_gb_removes_the_least_recently_used_until_it_fits(cache_folder):
    c = cache_folder
    entries = tl_cache.scan(c["cache"])
    total = sum(e.size for e in entries)
    keep = size_of(c["img24"]) + sum(c[k].stat().st_size for k in ("temp", "live_temp", "fresh_orphan"))
    # Room for the newest image cache and what is never removed: everything older goes, oldest first.
    limit_gb = (keep + 10) / 1e9
    before = sorted(p.name for p in c["cache"].iterdir())
    dry = cache_cli("prune", "--cache-dir", str(c["cache"]), "--max-gb", f"{limit_gb:.12f}", "--dry-run")
    assert sorted(p.name for p in c["cache"].iterdir()) == before  # a dry run removes nothing
    assert all(p.exists() for p in (c["old_images"], c["features"], c["orphan"], c["img32"]))
    out = cache_cli("prune", "--cache-dir", str(c["cache"]), "--max-gb", f"{limit_gb:.12f}")
    order = re.findall(r"^removed \S+ (\S+) \(", out, flags=re.M)
    assert order == [c["dead_temp"].name, c["old_images"].stem, c["features"].stem, c["orphan"].stem, c["img32"].stem]
    assert dry.replace("would remove", "removed").splitlines()[:5] == out.splitlines()[:5]
    assert sorted(p.name for p in c["cache"].iterdir()) == sorted(
        [c["img24"].name, c["img24"].with_suffix(".json").name, c["temp"].name, c["live_temp"].name,
         c["fresh_orphan"].name])
    assert sum(e.size for e in tl_cache.scan(c["cache"])) == keep < total

    # Below what can go: every removable entry goes, the temporary file and the fresh array stay, and it
    # says why the folder is still above the limit.
    out = cache_cli("prune", "--cache-dir", str(c["cache"]), "--max-gb", "0")
    assert re.findall(r"^removed \S+ (\S+) \(", out, flags=re.M) == [c["img24"].stem]
    assert sorted(p.name for p in c["cache"].iterdir()) == sorted(
        [c["temp"].name, c["live_temp"].name, c["fresh_orphan"].name])
    assert "note: still above 0 GB" in out


def test_a_pruned_cache_is_built_again_by_the_next_run(cache_folder, image_tree, tmp_path, capsys):
    c = cache_folder
    cache_cli("prune", "--cache-dir", str(c["cache"]), "--max-gb", "0")
    assert not c["img32"].exists()
    assert "decoding 40 images once" in train(image_tree, tmp_path, c["cache"], "after", 32, capsys)
    assert c["img32"].exists() and c["img32"].with_suffix(".json").exists()


@pytest.mark.parametrize("args, message", [
    (["prune"], "error: prune needs --max-gb G or --older-than DAYS (or both)"),
    (["prune", "--older-than", "-1"], "error: --max-gb and --older-than must be 0 or more"),
    (["prune", "--max-gb", "1", "--cache-dir", "/no/such/folder"], "error: --cache-dir /no/such/folder does not exist"),
    (["remove"], "error: argument command: invalid choice: 'remove'"),
])
def test_bad_cache_commands_get_one_error_line(args, message, tmp_path):
    if "--cache-dir" not in args:
        args = [*args, "--cache-dir", str(tmp_path)]
    proc = run_module(args, module="tl_dist.cache")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
