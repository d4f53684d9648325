"""What an evaluation shows a person: a per-class table, a confusion matrix, the worst mistakes, a summary.

Built from `evaluate()`'s gathered outputs (logits, labels, positions in split order), which are the same
on every process, so the report is the same for any number of processes. `build_report` is cheap and runs
everywhere; `write_report` draws the pictures and runs on the main process only; `log_report` hands them to
W&B through the Tracker (a no-op when W&B is off or on other processes).

Files, in the run folder:
- per_class.csv        support, accuracy, precision, recall, F1 and the most frequent wrong guess per class
- confusion_matrix.csv the full matrix with class names (rows = true class, columns = predicted class)
- confusion_matrix.png the most confused classes, ordered so that the largest confusions come first
- mistakes.png         the highest-confidence wrong predictions, captioned `pred / label / confidence`
- mistakes.csv         the same mistakes with their files (from the run's split.json), to look at or relabel

Pictures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display needed) and
torchvision's `make_grid`.
"""

from __future__ import annotations

import csv
import functools
import math
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF
from torchvision.utils import make_grid

from tl_dist.metrics import class_scores, confusion_matrix

from tl_dist.run_dir import CONFUSION_CSV, FINAL_MODEL, METRICS_FILE, is_disk_full, report_files

MAX_MATRIX_CLASSES = 30  # more rows than this are unreadable in a picture; the CSV has them all
MAX_PAIRS = 20  # confused pairs listed beside the matrix
MAX_MISTAKES = 24  # pictures in the mistakes grid (4 rows of 6)
GRID_COLUMNS = 6
TILE = 176  # px per picture in the grid: 6 tiles make it ~1100 px wide whatever the run's image size
CAPTION = 46  # px of white band above each picture for its three caption lines
DPI = 100
# Class names may be in any script. matplotlib (>= 3.6) draws each character with the first of these families
# that has it: DejaVu Sans (its default: Latin, Greek, Cyrillic), then Noto Sans CJK (Debian/Ubuntu package
# fonts-noto-cjk: Chinese, Japanese, Korean). Families that are not installed are left out.
FONT_FAMILIES = ("DejaVu Sans", "Noto Sans CJK JP")
FONT_FILES = ("NotoSansCJK-Regular", "NotoSansCJK-Bold")  # found on disk when matplotlib's font list predates them
WANDB_CONFUSION_PRESET = "wandb/confusion_matrix/v1"  # the chart wandb.plot.confusion_matrix draws
WANDB_CONFUSION_COLUMNS = ["Actual", "Predicted", "nPredictions"]  # the preset's field names


@dataclass
class Report:
    classes: list[str]
    confusion: torch.Tensor  # C x C int64, rows = true class, columns = predicted class
    mistake_positions: list[int]  # test-split positions of the worst mistakes, most confident first
    mistake_preds: list[int]
    mistake_labels: list[int]
    mistake_confidences: list[float]  # softmax probability of the (wrong) predicted class
    num_wrong: int

    @property
    def num_samples(self) -> int:
        return int(self.confusion.sum())

    def per_class(self) -> list[dict]:
        """One row per class, in class order, from metrics.class_scores. A class's accuracy is its recall
        (the fraction of its test images classified correctly): Caltech-101's usual figure is the mean of
        it over the classes. Accuracy, recall and F1 are None for a class without test images."""
        scores = class_scores(self.confusion)
        off_diagonal = self.confusion - torch.diag(self.confusion.diag())
        rows = []
        for c, name in enumerate(self.classes):
            present = bool(scores.present[c])
            recall = scores.recall[c].item() if present else None
            confused = int(off_diagonal[c].argmax()) if off_diagonal[c].sum() > 0 else None
            rows.append({"class": name, "support": int(scores.support[c]), "correct": int(scores.correct[c]),
                         "accuracy": recall, "precision": scores.precision[c].item(), "recall": recall,
                         "f1": scores.f1[c].item() if present else None,
                         "most_confused_with": self.classes[confused] if confused is not None else None,
                         "most_confused_count": int(off_diagonal[c, confused]) if confused is not None else 0})
        return rows

    def weakest(self, n: int = 10) -> list[dict]:
        """The n classes with the lowest accuracy (ties: lower F1, then more test images, then name)."""
        present = [r for r in self.per_class() if r["support"] > 0]
        return sorted(present, key=lambda r: (r["accuracy"], r["f1"], -r["support"], r["class"]))[:n]

    def confused_pairs(self, n: int = MAX_PAIRS) -> list[tuple[int, int, int]]:
        """(true, predicted, count) of the n largest off-diagonal cells, largest first (ties: class order)."""
        cm = self.confusion.clone()
        cm.fill_diagonal_(0)
        flat = cm.flatten()
        nonzero = flat.nonzero().flatten().tolist()
        nonzero.sort(key=lambda i: (-int(flat[i]), i))
        k = len(self.classes)
        return [(i // k, i % k, int(flat[i])) for i in nonzero[:n]]


def build_report(outputs: dict, classes: list[str]) -> Report:
    """From evaluate()'s outputs (in split order, identical on every process)."""
    logits, labels, positions = outputs["logits"].float(), outputs["labels"].long(), outputs["positions"].long()
    confidence, preds = F.softmax(logits, dim=1).max(1)
    wrong = (preds != labels).nonzero().flatten()
    # Most confident first; a stable sort keeps split order among equal confidences.
    order = wrong[torch.sort(-confidence[wrong], stable=True).indices][:MAX_MISTAKES]
    return Report(classes=list(classes), confusion=confusion_matrix(preds, labels, len(classes)),
                  mistake_positions=positions[order].tolist(), mistake_preds=preds[order].tolist(),
                  mistake_labels=labels[order].tolist(), mistake_confidences=confidence[order].tolist(),
                  num_wrong=len(wrong))


# ---------------------------------------------------------------- files


def write_report(report: Report, folder: Path, test_images, test_files: list[str], warn=print) -> None:
    """Write the CSVs and the two pictures into `folder` (main process). `test_images` gives uint8 images
    by test-split position (data.CachedImages), `test_files` their files. The metrics are saved before
    this runs (and the model beside it), so a file that cannot be written is a warning, not a failed run."""
    files = report_files(folder)
    steps = [("per-class table", lambda: write_per_class_csv(report, files["per-class table"])),
             ("confusion matrix, all classes",
              lambda: write_confusion_csv(report, files["confusion matrix, all classes"])),
             ("confusion matrix", lambda: draw_confusion_matrix(report, files["confusion matrix"])),
             ("worst mistakes", lambda: draw_mistakes(
                 report, test_images.images(report.mistake_positions) if report.mistake_positions else None,
                 files["worst mistakes"]))]
    steps.append(("worst mistakes, with files", lambda: write_mistakes_csv(report, test_files, files[
        "worst mistakes, with files"])))
    _warn_missing_glyphs(report.classes, warn)
    for what, write in steps:
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - see the docstring; a full disk stops the run instead
            if is_disk_full(exc, Path(folder)):
                raise
            warn(f"warning: could not write the {what} ({files[what]}): {type(exc).__name__}: {exc}")


def _warn_missing_glyphs(classes: list[str], warn) -> None:
    try:
        missing = missing_glyphs(classes)
    except Exception as exc:  # noqa: BLE001 - a font problem must not fail a finished run
        warn(f"warning: could not check the fonts for the class names: {type(exc).__name__}: {exc}")
        return
    if missing:
        warn(f"warning: no installed font has the characters {missing!r} of the class names: the pictures show "
             f"them as boxes (install a font for them, e.g. Debian's fonts-noto-core or fonts-noto-cjk)")


def write_per_class_csv(report: Report, path: Path) -> None:
    columns = ["class", "support", "correct", "accuracy", "precision", "recall", "f1", "most_confused_with",
               "most_confused_count"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in report.per_class():
            writer.writerow({k: ("" if v is None else f"{v:.6f}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def write_confusion_csv(report: Report, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *report.classes])
        for name, row in zip(report.classes, report.confusion.tolist()):
            writer.writerow([name, *row])


def write_mistakes_csv(report: Report, test_files: list[str] | None, path: Path) -> None:
    """Position k of the test split is the k-th file of `test_files` (the run's split, in order)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["rank", "test_position", "file", "label", "pred", "confidence"])
        for rank, (pos, pred, label, conf) in enumerate(zip(report.mistake_positions, report.mistake_preds,
                                                            report.mistake_labels, report.mistake_confidences), 1):
            writer.writerow([rank, pos, test_files[pos] if test_files else "", report.classes[label],
                             report.classes[pred], f"{conf:.6f}"])


def matrix_classes(report: Report, limit: int = MAX_MATRIX_CLASSES) -> list[int]:
    """The classes to draw, in drawing order: those of the largest confusions first (each pair's true
    class, then its predicted one), then, room permitting, the other classes in class order."""
    order: list[int] = []
    for true, pred, _ in report.confused_pairs(n=len(report.classes) ** 2):
        for c in (true, pred):
            if c not in order:
                order.append(c)
    order += [c for c in range(len(report.classes)) if c not in order]
    return order[:limit]


def _figure(width_px: int, height_px: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


@functools.cache
def font_families() -> list[str]:
    """The installed ones of FONT_FAMILIES. matplotlib caches its font list on disk the first time it runs,
    so a font installed after that is added here from the system's font folders."""
    from matplotlib import font_manager

    manager = font_manager.fontManager
    if not set(FONT_FAMILIES) <= {f.name for f in manager.ttflist}:
        for path in font_manager.findSystemFonts():
            if Path(path).stem in FONT_FILES:
                manager.addfont(path)
    known = {f.name for f in manager.ttflist}
    return [family for family in FONT_FAMILIES if family in known]


def missing_glyphs(texts: list[str]) -> str:
    """The characters of `texts` that none of font_families() has: they would be drawn as boxes."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    covered: set[int] = set()
    for family in font_families():
        path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        covered |= set(FT2Font(path).get_charmap())
    return "".join(sorted({ch for text in texts for ch in text if ord(ch) not in covered and ch.isprintable()}))


def _with_name_fonts(draw):
    """Draw with the fallback fonts; matplotlib's warning per missing character is replaced by
    write_report's one line that names them."""
    @functools.wraps(draw)
    def drawing(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"font.family": font_families()}), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            return draw(*args, **kwargs)
    return drawing


@_with_name_fonts
def draw_confusion_matrix(report: Report, path: Path) -> None:
    """Left: the confusion matrix of the most confused classes, counts in the cells; correct predictions
    in green, confusions in red, both shaded by the share of the true class. Right: the largest confusions
    as bars. Class names everywhere."""
    from matplotlib import colormaps

    shown = matrix_classes(report)
    names = report.classes
    cm = report.confusion[shown][:, shown].numpy()
    support = report.confusion.sum(1)[shown].numpy().clip(min=1)
    share = cm / support[:, None]
    n = len(shown)

    # Layout in pixels: names | matrix | names of the pairs | bars.
    cell = 30 if n > 15 else 40
    side = max(n * cell, 300)
    names_px, gap_px, bars_px = 190, 300, 400
    width, height = names_px + side + gap_px + bars_px + 50, side + 280
    fig = _figure(width, height)
    bottom = 190 / height
    ax = fig.add_axes((names_px / width, bottom, side / width, side / height))
    diagonal = np.eye(n, dtype=bool)
    ax.imshow(np.ma.masked_where(~diagonal, share), cmap=colormaps["Greens"], vmin=0, vmax=1.25)
    ax.imshow(np.ma.masked_where(diagonal | (cm == 0), share), cmap=colormaps["Reds"], vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7 if n > 15 else 9,
                        color="white" if share[i, j] > 0.6 else "black")
    ticks = [_short(names[c], 22) for c in shown]  # 22 columns fit the 190 px margins at 8 pt
    ax.set_xticks(range(n), ticks, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(n), ticks, fontsize=8)
    ax.set_xticks(np.arange(n + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(n + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    # Axis labels just beyond the longest tick label (about 5.5 px per column at 8 pt; 60 degrees down).
    names_extent = 14 + 5.5 * max(_columns(t) for t in ticks)
    fig.text((names_px + side / 2) / width, max(6, 190 - 14 - 0.87 * names_extent) / height, "predicted class",
             ha="center", va="top")
    fig.text(max(6, names_px - names_extent - 4) / width, bottom + side / 2 / height, "true class",
             rotation=90, ha="right", va="center")
    total = len(names)
    scope = f"the {n} most confused of {total} classes" if n < total else f"all {total} classes"
    # Title and legend span the whole figure (at least 1240 px wide), so no class count or name clips them.
    fig.text(0.5, 1 - 16 / height, f"Confusion matrix, test split: {scope}", ha="center", va="center",
             fontsize=12)
    fig.text(0.5, 1 - 38 / height, f"rows = true class; green = correct, red = confused, shade = share of the "
             f"true class; every class in {CONFUSION_CSV}", ha="center", va="center", fontsize=9.5)

    _draw_confusion_bars(report, fig.add_axes(((names_px + side + gap_px) / width, bottom, bars_px / width,
                                               side / height)))
    fig.savefig(path, dpi=DPI)


def _draw_confusion_bars(report: Report, bars) -> None:
    """The largest confusions as horizontal bars, largest on top, named `true → predicted`."""
    pairs = report.confused_pairs()
    names = report.classes
    if pairs:
        labels = [f"{_short(names[t], 18)} → {_short(names[p], 18)}" for t, p, _ in pairs]  # fit the gap
        counts = [c for _, _, c in pairs]
        y = np.arange(len(pairs))
        bars.barh(y, counts, color="#d62728")
        bars.set_yticks(y, labels, fontsize=8)
        bars.invert_yaxis()
        bars.set_xlabel("test images")
        bars.xaxis.get_major_locator().set_params(integer=True)
        for yi, c in zip(y, counts):
            bars.text(c, yi, f" {c}", va="center", fontsize=8)
    else:
        bars.set_axis_off()
        bars.text(0.5, 0.5, "no confusions:\nevery test image is classified correctly", ha="center",
                  va="center", fontsize=11, transform=bars.transAxes)
    bars.set_title(f"Largest confusions (true → predicted)\n{report.num_wrong} of {report.num_samples} "
                   f"test images wrong", fontsize=10)


def _column_widths(name: str) -> list[int]:
    """Display columns per character: a wide (CJK) character takes two."""
    return [2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in name]


def _columns(name: str) -> int:
    return sum(_column_widths(name))


def _short(name: str, limit: int = 22) -> str:
    """`name` cut to `limit` columns, ending in an ellipsis when cut."""
    columns = _column_widths(name)
    if sum(columns) <= limit:
        return name
    cut, used = 0, 0
    while used + columns[cut] <= limit - 1:  # - 1: room for the ellipsis
        used += columns[cut]
        cut += 1
    return name[:cut] + "…"


@_with_name_fonts
def draw_mistakes(report: Report, images: torch.Tensor | None, path: Path) -> None:
    """The most confident wrong predictions as one grid (torchvision's make_grid), each picture under a
    white band with its caption: predicted class, true class, confidence."""
    n = len(report.mistake_positions)
    rows = max(1, math.ceil(n / GRID_COLUMNS))
    tiles = torch.full((rows * GRID_COLUMNS, 3, CAPTION + TILE, TILE), 255, dtype=torch.uint8)
    if images is not None:
        # Nearest-neighbour up-scaling keeps small (e.g. 32 px) images honest; larger ones are shrunk.
        mode = TF.InterpolationMode.NEAREST if images.shape[-1] < TILE else TF.InterpolationMode.BILINEAR
        tiles[:n, :, CAPTION:] = TF.resize(images, [TILE, TILE], interpolation=mode, antialias=True)
    pad = 6
    grid = make_grid(tiles, nrow=GRID_COLUMNS, padding=pad, pad_value=255)  # 3 x H x W uint8
    header = 50
    height, width = grid.shape[1] + header, grid.shape[2]
    fig = _figure(width, height)
    ax = fig.add_axes((0, 0, 1, grid.shape[1] / height))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    names = report.classes
    for k in range(n):
        x = pad + (k % GRID_COLUMNS) * (TILE + pad)
        y = pad + (k // GRID_COLUMNS) * (TILE + CAPTION + pad)
        pred, label = names[report.mistake_preds[k]], names[report.mistake_labels[k]]
        ax.text(x + 2, y + 2, f"pred: {_short(pred, 18)}", color="#c00000", fontsize=8.5, va="top",
                fontweight="bold")
        ax.text(x + 2, y + 16, f"label: {_short(label, 18)}", color="#006000", fontsize=8.5, va="top")
        ax.text(x + 2, y + 30, f"confidence: {report.mistake_confidences[k]:.1%}", fontsize=8.5, va="top")
    title = (f"The {n} most confident mistakes on the test split ({report.num_wrong} of {report.num_samples} "
             f"test images wrong)" if n else f"No mistakes: all {report.num_samples} test images are "
             f"classified correctly")
    fig.text(0.5, 1 - 25 / height, title, ha="center", va="center", fontsize=12)
    fig.savefig(path, dpi=DPI)


# ---------------------------------------------------------------- W&B


def wandb_confusion_rows(report: Report) -> list[list]:
    """[true class, predicted class, count] for each non-zero cell of the confusion matrix, which counts
    every test image. wandb.plot.confusion_matrix writes all C x C cells instead, so from 101 classes on
    it passes wandb.Table's 10,000-row limit and W&B silently drops the last rows (and their images).
    Non-zero cells are at most one per test image, so this stays exact below 10,000 test images."""
    names = report.classes
    return [[names[t], names[p], int(report.confusion[t, p])] for t, p in report.confusion.nonzero().tolist()]


def log_report(tracker, report: Report, run_dir: Path, prefix: str, step: int) -> None:
    """The per-class table, W&B's interactive confusion matrix (its own preset, fed the non-zero cells),
    and the two pictures, under prefix/."""
    if not (tracker.enabled and tracker.accelerator.is_main_process):
        return
    import wandb

    files = {what: path for what, path in report_files(run_dir).items() if path.is_file()}
    columns = ["class", "support", "accuracy", "precision", "recall", "f1", "most_confused_with"]
    table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in report.per_class()])
    cells = wandb.Table(columns=WANDB_CONFUSION_COLUMNS, data=wandb_confusion_rows(report))
    values = {f"{prefix}/per_class": table,
              f"{prefix}/confusion_matrix": wandb.plot_table(
                  WANDB_CONFUSION_PRESET, cells, fields={c: c for c in WANDB_CONFUSION_COLUMNS},
                  string_fields={"title": "Confusion matrix (test)"})}
    for key, what in (("confusion_matrix_top", "confusion matrix"), ("mistakes", "worst mistakes")):
        if what in files:
            values[f"{prefix}/{key}"] = wandb.Image(str(files[what]))
    tracker.log(values, step=step)


# ---------------------------------------------------------------- terminal


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"


def print_summary(console, report: Report, baseline: dict | None, finetuned: dict, run_dir: Path) -> None:
    """Baseline vs fine-tuned, the 10 weakest classes, and where the files are (main process only: the
    RunConsole is quiet elsewhere)."""
    from rich.table import Table

    console.comparison(baseline, finetuned)
    weakest = report.weakest(10)
    table = Table(title=f"The {len(weakest)} weakest of {len(report.classes)} classes (test split)")
    for name, justify in (("class", "left"), ("images", "right"), ("accuracy", "right"), ("prec.", "right"),
                          ("F1", "right"), ("mistaken for", "left")):
        table.add_column(name, justify=justify, no_wrap=name == "class")
    for r in weakest:
        confused = (f"{r['most_confused_with']} ({r['most_confused_count']})" if r["most_confused_with"]
                    else "-")
        table.add_row(r["class"], str(r["support"]), _pct(r["accuracy"]), _pct(r["precision"]), _pct(r["f1"]),
                      confused)
    console.print(table)
    # Plain lines, never folded: a path must stay whole to be copied.
    console.print("[bold]Files[/]")
    run_dir = Path(run_dir)
    files = {"metrics": run_dir / METRICS_FILE, **report_files(run_dir), "final model": run_dir / FINAL_MODEL}
    for what, path in files.items():
        if path.exists():
            console.print(f"  {what + ':':<28} {path}", soft_wrap=True)
