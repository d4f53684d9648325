"""What --cache-dir holds, and how to trim it: `python -m tl_dist.cache list` and
`python -m tl_dist.cache prune --max-gb G` / `--older-than DAYS` (both may be given; `--dry-run` shows what
would go).

Its entries are cache_entry.CacheEntry's: an array `<kind>-<key>....npy` with its `.json` sidecar, written
last (an array without one is incomplete): the decoded images (`images-<key>-<S>px`, data.ImageCache) and the
frozen backbone's features (`features-<key>`, sidecar {"kind": "features", "key": {...}, "rows": N}). An
entry's last use is the newest modification time of its files; a run that reuses an entry touches its
sidecar. `prune` removes the least recently used complete entries first, the sidecar before the array (so no
run picks up a half-removed entry). What nothing can use goes whatever the criteria: a damaged entry (its
size or checksum is not what was written), and a writer's temporary file (a name starting with '.') whose
writer is gone (CacheEntry's rule: a pid that no longer runs on this host, or untouched for a day whatever
the host).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tl_dist.cache_entry import KINDS, CacheEntry, writer_of, writer_state
from tl_dist.config import Config
from tl_dist.console import CommandParser

GB = 1000 ** 3
DAY = 86400.0
ORPHAN_AGE = 3600.0  # an array without its sidecar this long after its last write: its writer crashed


def default_cache_dir() -> str:
    field = next(f for f in dataclasses.fields(Config) if f.name == "cache_dir")
    return os.path.expanduser(field.default)


@dataclass
class Entry:
    name: str  # the array's name without .npy
    kind: str  # images | features | incomplete | damaged | temp
    files: list[Path]
    size: int  # bytes, all its files
    last_use: float  # newest mtime of its files (epoch seconds)
    key: str  # the key fields that tell entries apart, for people

    unusable: bool = False  # damaged, or a temp file whose writer is known to be gone: nothing can use it

    @property
    def removable(self) -> bool:
        return self.kind in KINDS or self.kind == "incomplete" and time.time() - self.last_use > ORPHAN_AGE


def _stat(paths: list[Path]) -> tuple[int, float]:
    stats = [p.stat() for p in paths]
    return sum(s.st_size for s in stats), max(s.st_mtime for s in stats)


def _key_fields(name: str, meta: dict) -> str:
    if isinstance(meta.get("key"), dict):
        fields = [f"{k}={v}" for k, v in meta["key"].items()]
    else:  # a decoded-image cache: the key is a hash of the data folder's files and the image size
        fields = [f"key={name.split('-')[1] if '-' in name else name}"]
        fields += [f"{k}={meta[k]}" for k in ("image_size", "files") if k in meta]
        if isinstance(meta.get("bad"), dict):
            fields.append(f"undecodable={len(meta['bad'])}")
    if "rows" in meta:
        fields.append(f"rows={meta['rows']}")
    return " ".join(fields)


def scan(cache_dir: Path) -> list[Entry]:
    """Every entry under cache_dir, most recently used first. Files that vanish while we look are left out
    (another prune, or a writer renaming its temporary file)."""
    entries = []
    if not cache_dir.is_dir():
        return entries
    for array in sorted(cache_dir.iterdir()):
        try:
            entries.append(_entry(array))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return sorted((e for e in entries if e is not None), key=lambda e: -e.last_use)


def _entry(path: Path) -> Entry | None:
    if path.name.startswith(".") and path.suffix == ".lock":
        return None  # an entry's build lock (empty): removed with its entry
    if path.name.startswith("."):
        size, used = _stat([path])
        if (writer := writer_of(path.name)) is None:
            return Entry(path.name, "temp", [path], size, used, "a writer's temporary file")
        state = writer_state(path)
        return Entry(path.name, "temp", [path], size, used, f"writer pid {writer[1]} on {writer[0]}"
                     + {"gone": ": gone", "running": ": running", "unknown": ""}[state], unusable=state == "gone")
    if path.suffix != ".npy":
        return None  # a sidecar (read with its array) or a file that is not ours
    entry = CacheEntry(path.parent, path.stem)
    if not entry.meta_path.is_file():
        size, used = _stat([path])
        return Entry(path.stem, "incomplete", [path], size, used, "no sidecar: its writer did not finish")
    files = entry.files()
    size, used = _stat(files)
    if why := entry.damage():
        return Entry(path.stem, "damaged", files, size, used, why, unusable=True)
    meta = entry.meta()
    kind = meta.get("kind") or path.stem.split("-")[0]
    return Entry(path.stem, kind if kind in KINDS else "other", files, size, used,
                 _key_fields(path.stem, meta if isinstance(meta, dict) else {}))


def _size(n: float) -> str:
    from rich.filesize import decimal

    return decimal(int(n))


def _when(t: float) -> str:
    days = (time.time() - t) / DAY
    stamp = datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")
    return f"{stamp}, {days:.0f} days ago" if days >= 1 else f"{stamp}, today"


def list_entries(cache_dir: Path, console) -> int:
    from rich.table import Table

    entries = scan(cache_dir)
    if not entries:
        console.print(f"{cache_dir}: no cache entries")
        return 0
    table = Table(title=f"{cache_dir}: {len(entries)} entries, {_size(sum(e.size for e in entries))}")
    for column in ("kind", "key", "size", "last use", "file"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for e in entries:
        table.add_row(e.kind, e.key, _size(e.size), _when(e.last_use), e.name)
    console.print(table)
    return 0


def choose(entries: list[Entry], max_bytes: float | None, older_than_days: float | None) -> list[Entry]:
    """What prune removes: what nothing can use (damaged entries, temp files whose writer is gone), removable
    entries unused for longer than the age, then the least recently used until everything left (live
    writers' temp files included) fits in max_bytes."""
    now = time.time()
    removable = sorted((e for e in entries if e.removable), key=lambda e: e.last_use)
    chosen = [e for e in entries if e.unusable]
    chosen += [e for e in removable if older_than_days is not None and now - e.last_use > older_than_days * DAY]
    total = sum(e.size for e in entries) - sum(e.size for e in chosen)
    for e in removable:
        if max_bytes is None or total <= max_bytes:
            break
        if e not in chosen:
            chosen.append(e)
            total -= e.size
    return chosen


def prune(cache_dir: Path, max_gb: float | None, older_than: float | None, dry_run: bool, console) -> int:
    entries = scan(cache_dir)
    chosen = choose(entries, None if max_gb is None else max_gb * GB, older_than)
    verb = "would remove" if dry_run else "removed"
    freed = 0
    for e in chosen:
        if not dry_run:
            for path in e.files:  # the sidecar first: from then on no run takes the entry as complete
                path.unlink(missing_ok=True)
        freed += e.size
        why = f"; {e.key}" if e.kind in ("temp", "damaged") else ""
        console.print(f"{verb} {e.kind} {e.name} ({_size(e.size)}, last use {_when(e.last_use)}{why})")
    left = sum(e.size for e in entries) - freed
    console.print(f"{verb} {len(chosen)} entr{'y' if len(chosen) == 1 else 'ies'}, {_size(freed)} freed; "
                  f"{cache_dir} {'would hold' if dry_run else 'now holds'} {_size(left)}")
    if max_gb is not None and left > max_gb * GB:
        console.print(f"note: still above {max_gb:g} GB: the rest is temporary files of running (or unknown) "
                      "writers, or arrays written within the last hour whose sidecar is not there yet; prune "
                      "never removes those")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="tl_dist.cache", description="List or trim the decoded-image and feature caches.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for name, help in (("list", "every entry: kind, key fields, size, last use"),
                       ("prune", "remove the least recently used entries")):
        command = commands.add_parser(name, help=help)
        command.add_argument("--cache-dir", default=default_cache_dir(), help="the cache folder (default: "
                             "tl_dist.train's --cache-dir default)")
        if name == "prune":
            command.add_argument("--max-gb", type=float, help="remove least recently used entries until the "
                                 "folder holds at most G GB (10^9 bytes)")
            command.add_argument("--older-than", type=float, metavar="DAYS",
                                 help="remove entries not used for more than DAYS days")
            command.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=max(console.width, 200), soft_wrap=True)
    cache_dir = Path(args.cache_dir).expanduser()
    if args.command == "list":
        return list_entries(cache_dir, console)
    if args.max_gb is None and args.older_than is None:
        parser.error("prune needs --max-gb G or --older-than DAYS (or both)")
    if (args.max_gb is not None and args.max_gb < 0) or (args.older_than is not None and args.older_than < 0):
        parser.error("--max-gb and --older-than must be 0 or more")
    if not cache_dir.is_dir():
        parser.error(f"--cache-dir {cache_dir} does not exist; pass the folder your runs cache into")
    return prune(cache_dir, args.max_gb, args.older_than, args.dry_run, console)


if __name__ == "__main__":
    sys.exit(main())
