"""The `fbft` command line.

fbft synth ROOT                 generate the synthetic tiny-defect benchmark
fbft predict --model M --out DIR IMAGES...   score images with a saved or MLflow detector
fbft cache info                 teachers, entries, size and free disk of the token cache
fbft cache prune [--max-gb X] [--older-than DAYS] [--teacher T] [--all]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from fbft.cache import admin as cache_admin
from fbft.cache import features
from fbft.cache.common import human_bytes
from fbft.data import synthetic
from fbft.serve import command as predict


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fbft` command."""
    parser = argparse.ArgumentParser(
        prog="fbft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic.add_synth_command(commands)
    predict.add_predict_command(commands)
    add_cache_command(commands)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def add_cache_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fbft cache info|prune` on the teacher-token cache."""
    parser = subparsers.add_parser("cache", help="inspect or shrink the teacher-token cache")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("info", help="teachers, entries, size and free disk")
    shrink = actions.add_parser(
        "prune",
        help="delete idle entries (entries a trial is reading are skipped)",
        description="Delete idle entries; folders of older cache versions always go.",
    )
    for sub in (show, shrink):
        sub.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help="cache root as given to the studies (tokens in DIR/features; "
            f"default {features.default_cache_dir()})",
        )
    shrink.add_argument("--max-gb", type=float, help="evict least recently used beyond this")
    shrink.add_argument("--older-than", type=float, metavar="DAYS", help="unused for DAYS")
    shrink.add_argument("--teacher", help="only this teacher (id prefix or backbone name)")
    shrink.add_argument("--all", action="store_true", help="every idle entry")
    show.set_defaults(func=_info)
    shrink.set_defaults(func=_prune)
    return parser


def _root(args: argparse.Namespace) -> Path:
    return (args.cache_dir or features.default_cache_dir()).expanduser() / "features"


def _info(args: argparse.Namespace) -> int:
    summary = cache_admin.info(_root(args))
    made = cache_admin.datasets(_root(args).parent / "synthetic")
    print(f"cache {Path(summary['root']).parent}")
    for t in summary["teachers"]:
        ident = t["identity"]
        if t["current"]:
            used = t["last_used"]
            last = time.strftime("%Y-%m-%d %H:%M", time.localtime(used)) if used else "never"
            what = (
                f"{ident.get('backbone', '?')} {ident.get('image_size', '?')}px "
                f"layers {ident.get('layers', '?')} {ident.get('dtype', '?')}: "
                f"{t['entries']} entries, {human_bytes(t['bytes'])}, last used {last}"
            )
        else:
            what = f"old cache version, unreadable: {human_bytes(t['bytes'])} (removed by prune)"
        print(f"  features/{t['id']}  {what}")
    for d in made:
        cats = ", ".join(d["categories"]) or "none finished"
        print(f"  synthetic/{d['id']}  generated data: {cats}; {human_bytes(d['bytes'])}")
    free = summary["free_bytes"]
    data = sum(d["bytes"] for d in made)
    print(
        f"total {summary['entries']} entries, {human_bytes(summary['bytes'])}"
        + (f"; synthetic data {human_bytes(data)}" if made else "")
        + f"; free disk {'?' if free is None else human_bytes(free)}"
    )
    return 0


def _prune(args: argparse.Namespace) -> int:
    root = _root(args)
    if not root.exists():
        print(f"no cache at {root}")
        return 0
    result = cache_admin.prune(root, args.max_gb, args.older_than, args.teacher, args.all)
    print(
        f"removed {result.removed} entries ({human_bytes(result.freed_bytes)}); "
        f"{result.busy} in use by a trial were kept"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
