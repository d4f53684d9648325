"""Progress on every long phase: a bar in a terminal, count/total lines in a log (every 10% or 30 s), from
rank zero only. The cadence with a fake clock, the bar with a forced terminal, and a real 2-process run
whose captured (non-terminal) output is read back."""

from __future__ import annotations

import io
import math
import re
import shutil

from conftest import launch, make_image_tree, tiny_args
from rich.console import Console

from tl_dist.checkpoint import SAVE_STEPS
from tl_dist.console import PlainPhase, RunConsole


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counts(lines: list[str]) -> list[int]:
    return [int(re.match(r"\S+ (\d+)/", line).group(1)) for line in lines]


def test_a_fast_phase_prints_every_tenth():
    lines = []
    phase = PlainPhase(lines.append, "decoding", 1000, clock=FakeClock())
    for _ in range(1000):
        phase.advance()
    phase.finish()
    assert counts(lines) == list(range(0, 1001, 100))
    assert lines[0] == "decoding 0/1000 images"


def test_a_slow_phase_prints_every_30_seconds():
    """One item a second, a tenth every 100 s: a line every 30 s between the tenths, so never more than
    30 s or 10% apart."""
    clock, lines, times = FakeClock(), [], []
    phase = PlainPhase(lambda line: (lines.append(line), times.append(clock.now)), "features", 1000,
                       clock=clock)
    for _ in range(1000):
        clock.now += 1.0
        phase.advance()
    phase.finish()
    seen = counts(lines)
    assert seen[:7] == [0, 30, 60, 90, 100, 130, 160]  # 30 s apart, and at the tenth (100)
    assert seen[-1] == 1000 and seen == sorted(set(seen))
    assert max(b - a for a, b in zip(seen, seen[1:])) <= 100
    assert max(b - a for a, b in zip(times, times[1:])) <= 30
    assert lines[1] == "features 30/1000 images (1.0 images/s, ETA 16:10)"  # 970 left at 1/s


def test_uneven_steps_and_the_end():
    """Batches larger than a tenth: one line per batch; the end is printed once; an interrupted phase
    (no finish) does not claim to have completed."""
    lines = []
    phase = PlainPhase(lines.append, "evaluating", 12, clock=FakeClock())
    phase.advance(8)
    phase.advance(4)
    phase.finish()
    assert counts(lines) == [0, 8, 12]
    lines.clear()
    phase = PlainPhase(lines.append, "evaluating", 100, clock=FakeClock())
    phase.advance(3)
    assert counts(lines) == [0]  # below the first tenth, no time passed: quiet until more is done


def _console(is_main: bool, terminal: bool) -> tuple[RunConsole, io.StringIO]:
    out = io.StringIO()
    console = RunConsole(is_main)
    console.console = Console(file=out, force_terminal=terminal, width=100, quiet=not is_main)
    console.live = terminal
    return console, out


def test_run_console_phase_modes():
    console, out = _console(is_main=True, terminal=False)
    with console.phase("decoding", 5) as progress:
        for _ in range(5):
            progress.advance()
    assert counts(out.getvalue().splitlines()) == [0, 1, 2, 3, 4, 5]

    console, out = _console(is_main=False, terminal=False)  # another rank: silent
    with console.phase("decoding", 5) as progress:
        progress.advance(5)
    assert out.getvalue() == ""

    console, out = _console(is_main=True, terminal=True)  # a terminal: a rich bar with count, rate, ETA
    with console.phase("decoding", 40) as progress:
        for _ in range(4):
            progress.advance(10)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    final = [line for line in text.splitlines() if "decoding" in line][-1]
    assert "40/40" in final and "images/s" in final and "━" in final
    assert console.progress is None  # the display is stopped with the phase


def test_a_phase_inside_an_epoch_bar_shares_it():
    """Checkpoint saving happens while an epoch's bar is live: the phase adds a line to that display
    (rich allows one live display at a time) and leaves the epoch's bar running."""
    console, out = _console(is_main=True, terminal=True)
    task = console.start_task("epoch 1/1", 3)
    with console.phase("saving", 2, unit="files") as progress:
        progress.advance(2)
    assert console.progress is not None and len(console.progress.tasks) == 1
    console.advance(task, 3)
    console.stop_progress()


def _phases(stdout: str) -> list[tuple[str, list[int], int]]:
    """(phase, counts, total) for each phase in the output, in order; a phase's counts restart at 0."""
    runs = []
    for match in re.finditer(r"^(decoding|features|evaluating|saving checkpoint) "
                             r"(\d+)/(\d+) (?:images|steps)", stdout, re.M):
        name, count, total = match.group(1), int(match.group(2)), int(match.group(3))
        if count == 0 or not runs or runs[-1][0] != name:
            runs.append((name, [], total))
        runs[-1][1].append(count)
    return runs


def test_a_real_run_reports_every_phase_from_rank_zero(image_tree, tmp_path):
    """2 processes, output captured (not a terminal): each phase (the checkpoint's save among them) prints
    once (rank zero only), counts start at 0, rise strictly and end at the phase's total, at most a tenth
    (or one gathered batch: 2 processes x 4) apart. The decode counts rank zero's shard scaled to all images; the feature pass and
    evaluation count what was gathered from both processes. A class of a single image has no test image:
    one warning names it."""
    data = shutil.copytree(image_tree, tmp_path / "data")  # 4 classes x 10 images
    make_image_tree(tmp_path / "lonely", classes=1, per_class=1)
    shutil.copytree(tmp_path / "lonely" / "class_00", data / "lonely")
    proc = launch(tiny_args(data, tmp_path / "run", tmp_path / "cache", "--epochs", "1", "--wandb-mode",
                            "disabled"), nproc=2)
    n_test = 4 * 2  # 20% of each class of 10; the class of a single image keeps it for training
    n_train = 41 - n_test
    phases = _phases(proc.stdout)
    assert [(name, total) for name, _, total in phases] == [
        ("decoding", 41), ("features", n_train + n_test), ("evaluating", n_test), ("saving checkpoint", SAVE_STEPS),
        ("evaluating", n_test)], proc.stdout  # the checkpoint after the one epoch, then the final evaluation
    for name, seen, total in phases:
        assert seen[0] == 0 and seen[-1] == total and seen == sorted(set(seen)), (name, seen)
        assert max(b - a for a, b in zip(seen, seen[1:])) <= max(math.ceil(total / 10), 2 * 4), (name, seen)
    stderr = " ".join(proc.stderr.split())
    assert stderr.count("no test image") == 1 and "accuracy is not measured: lonely" in stderr, stderr
