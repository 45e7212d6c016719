"""The synthetic "tiny defects" benchmark: a licence-free MVTec-layout dataset made from scratch.

Three texture categories are built from CC0 textures that scikit-image ships (`gravel`,
`brick`, `grass`) and one object category (`parts`) is drawn from simple shaded shapes.
Test images hold 1-3 defects of one kind (`color_spot`, `scratch`, `patch`, `blur`) whose
areas are spread log-uniformly from 1 pixel to 3% of the image; each mask is exactly the set
of pixels that differ from the defect-free image. Everything is seeded: the same arguments give
byte-identical files. `fbft synth ROOT` is the command-line front end; the images are drawn by
:mod:`fbft.data.textures` (nominal) and :mod:`fbft.data.drawing` (defects).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fbft.data.common import DatasetError
from fbft.data.drawing import (
    CATEGORIES,
    KINDS,
    MAX_AREA_FRACTION,
    MIN_CHANGE,
    TEXTURES,
    max_area,
    render,
)

__all__ = ["CATEGORIES", "KINDS", "MIN_CHANGE", "SyntheticRootError", "generate", "render"]

logger = logging.getLogger(__name__)

GENERATOR = "fbft.data.synthetic"
VERSION = "1"
DEFECTS_PER_IMAGE = ((1, 2, 3), (0.6, 0.25, 0.15))
MIN_IMAGE_SIZE = 64
BBOX_FORMAT = "[x0, y0, x1, y1] in pixels, x1 and y1 exclusive"


class SyntheticRootError(DatasetError, FileExistsError):
    """The target folder holds something other than this exact synthetic dataset."""


@dataclass(frozen=True)
class _Task:
    """One image to render: where it goes, its random stream and its defects (kind, area)."""

    category: str
    relpath: str
    key: tuple[int, ...]
    defects: tuple[tuple[str, int], ...] = ()

    @property
    def mask_relpath(self) -> str:
        folder, name = self.relpath.rsplit("/test/", 1)
        kind, file = name.split("/")
        return f"{folder}/ground_truth/{kind}/{Path(file).stem}_mask.png"


# ----------------------------------------------------------------------------- dataset writing


def _plan(category: str, size: int, n_train: int, n_test: int, seed: int) -> list[_Task]:
    """Every image of one category: names, random streams and defects with stratified areas."""
    code = zlib.crc32(category.encode())
    rng = np.random.default_rng([seed, code, 2])
    n_good = max(1, n_test // 3)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_test - n_good)]
    counts = rng.choice(DEFECTS_PER_IMAGE[0], size=len(kinds), p=DEFECTS_PER_IMAGE[1])
    owners = [i for i, c in enumerate(counts) for _ in range(c)]
    # log-uniform areas, one per stratum, so that every size range is present; the largest
    # go first, each to a random defect whose kind can be that large
    top = math.log(MAX_AREA_FRACTION * size * size)
    strata = np.exp((np.arange(len(owners)) + rng.random(len(owners))) / len(owners) * top)[::-1]
    free = [int(i) for i in rng.permutation(len(owners))]
    areas = [0] * len(owners)
    for value in strata:
        fits = [i for i in free if value <= max_area(kinds[owners[i]], size)]
        chosen = fits[0] if fits else free[0]
        free.remove(chosen)
        areas[chosen] = max(1, round(min(value, max_area(kinds[owners[chosen]], size))))
    tasks = [
        _Task(category, f"{category}/train/good/{i:03d}.png", (seed, code, 0, i))
        for i in range(n_train)
    ]
    tasks += [
        _Task(category, f"{category}/test/good/{i:03d}.png", (seed, code, 1, i))
        for i in range(n_good)
    ]
    per_kind = dict.fromkeys(KINDS, 0)
    for j, kind in enumerate(kinds):
        defects = tuple((kind, areas[d]) for d, owner in enumerate(owners) if owner == j)
        tasks.append(
            _Task(
                category,
                f"{category}/test/{kind}/{per_kind[kind]:03d}.png",
                (seed, code, 1, n_good + j),
                defects,
            )
        )
        per_kind[kind] += 1
    return tasks


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)


def _write(task: _Task, folder: Path, size: int) -> list[dict]:
    """Render one task into `folder`; the defect records of its image."""
    img, mask, records = render(task.category, size, np.random.default_rng(task.key), task.defects)
    _save_png(folder / task.relpath, img)
    if not task.defects:
        return []
    _save_png(folder / task.mask_relpath, mask.astype(np.uint8) * 255)
    return [{"image": task.relpath, "mask": task.mask_relpath, **r} for r in records]


def _reusable(root: Path, params: dict[str, Any]) -> bool:
    """True when `root` already holds this dataset; raise when it holds anything else."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise SyntheticRootError(
                f"{root} has a manifest.json that is not readable JSON ({err}); refusing to "
                "overwrite it: choose another folder or delete this one"
            ) from err
        if not isinstance(found, dict) or found.get("generator") != GENERATOR:
            raise SyntheticRootError(
                f"{manifest} was not written by {GENERATOR}; refusing to overwrite {root}: "
                "choose another folder"
            )
        if found.get("version") == VERSION and found.get("parameters") == params:
            return True
        raise SyntheticRootError(
            f"{root} holds a synthetic dataset made with other settings (version "
            f"{found.get('version')}, {found.get('parameters')}) than the ones asked for "
            f"(version {VERSION}, {params}); choose another folder or delete {root} to regenerate"
        )
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise SyntheticRootError(
            f"{root} exists and is not a dataset generated by fbft (it has no manifest.json); "
            "refusing to write into it: choose a new or empty folder"
        )
    return False


def generate(
    root: str | os.PathLike[str],
    categories: list[str] | tuple[str, ...] | None = None,
    image_size: int = 1024,
    n_train: int = 60,
    n_test: int = 24,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the synthetic benchmark in MVTec AD layout under `root` and return `root`.

    categories: any of `CATEGORIES` (default all). Per category: `n_train` nominal training
    images; `n_test` test images, a third of them nominal (`test/good`), the rest defective in
    one folder per defect kind, with masks `ground_truth/<kind>/NNN_mask.png` (0/255) and a
    `manifest.json` at the root listing every defect. If `root` already holds the same dataset
    it is reused; any other content in `root` raises `SyntheticRootError`. The dataset is built
    in a temporary sibling folder and moved into place at the end; `progress` shows a bar.
    """
    if isinstance(categories, str):
        categories = [categories]
    chosen = sorted(set(CATEGORIES if categories is None else categories))
    unknown = [c for c in chosen if c not in CATEGORIES]
    if unknown or not chosen:
        raise ValueError(f"unknown synthetic categories {unknown}; choose among {list(CATEGORIES)}")
    if image_size < MIN_IMAGE_SIZE or n_train < 1 or n_test < 2 or seed < 0:
        raise ValueError(
            f"need image_size >= {MIN_IMAGE_SIZE}, n_train >= 1, n_test >= 2 (one nominal and one "
            f"defective image) and seed >= 0; got image_size={image_size}, n_train={n_train}, "
            f"n_test={n_test}, seed={seed}"
        )
    root = Path(root).expanduser()
    params = {
        "categories": chosen,
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "seed": int(seed),
    }
    if _reusable(root, params):
        logger.info("reusing the synthetic dataset in %s (same parameters)", root)
        return root
    tasks = [t for c in chosen for t in _plan(c, image_size, n_train, n_test, seed)]
    logger.info(
        "generating %d synthetic images of %dx%d into %s", len(tasks), image_size, image_size, root
    )
    started = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        partial.chmod(0o755)
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            written = pool.map(lambda t: _write(t, partial, image_size), tasks)
            if progress:
                from tqdm.auto import tqdm

                label = f"generating {', '.join(chosen)}"
                written = tqdm(written, total=len(tasks), desc=label, unit="image")
            defects = [r for rs in written for r in rs]
        manifest = {
            "generator": GENERATOR,
            "version": VERSION,
            "parameters": params,
            "categories": chosen,
            "defect_kinds": list(KINDS),
            "licence": "Generated by fbft; free of third-party rights except the CC0 texture "
            "sources listed under 'sources'.",
            "sources": {
                c: {k: v for k, v in TEXTURES[c].items() if k != "tint"}
                for c in chosen
                if c in TEXTURES
            },
            "bbox_format": BBOX_FORMAT,
            "images": {"train": len(chosen) * n_train, "test": len(chosen) * n_test},
            "defects": defects,
        }
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.replace(partial, root)
        except OSError:
            if not _reusable(root, params):  # raises unless a concurrent run wrote the same set
                raise
            logger.info("another run wrote the same dataset to %s first; reusing it", root)
            return root
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    logger.info("wrote %s in %.1f s", root, time.perf_counter() - started)
    return root


# ----------------------------------------------------------------------------- command line


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = generate(
            args.root, args.categories, args.image_size, args.n_train, args.n_test, args.seed
        )
    except (DatasetError, ValueError) as err:
        logger.error("fbft synth: error: %s", err)
        return 2
    print(path)
    return 0


def add_synth_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fbft synth ROOT [--categories ...] [--image-size N] ...`."""
    parser = subparsers.add_parser(
        "synth",
        help="generate the synthetic tiny-defect benchmark (MVTec AD layout)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "root", type=Path, help="folder to create (reused if it holds the same set)"
    )
    parser.add_argument(
        "--categories",
        nargs="+",
        choices=CATEGORIES,
        default=None,
        help="categories to generate (default: all)",
    )
    parser.add_argument(
        "--image-size", type=int, default=1024, help="side in pixels (default 1024)"
    )
    parser.add_argument("--n-train", type=int, default=60, help="training images per category")
    parser.add_argument(
        "--n-test", type=int, default=24, help="test images per category, a third of them nominal"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.set_defaults(func=_run)
    return parser
