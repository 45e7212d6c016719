"""Pre-flight: what would fail every trial, or fail one only after a full fit, is found on the
driver before Ray starts — empty categories, masks of the wrong size, a cache folder that
cannot be written (announced: it is then read-only), a teacher weights file that does not load
(built once on the CPU, then dropped; checked again for each backbone the trials use)."""

from __future__ import annotations

import gc
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fbft.core.config import PRESETS, FBFTConfig
from fbft.study.checks import CheckError
from fbft.study.options import Options

FIRST_MASKS = 3  # masks checked per category (the first defect images)
_loaded: set[tuple[str, str, str]] = set()  # teachers already built in this process


def before_ray(options: Options, cache_root: Path, categories: dict[str, list[str]]) -> None:
    """Every pre-flight check that needs no cluster."""
    cache(cache_root, options)
    data(categories, options)
    guessed = _config_before_ray(options)
    if guessed is not None:
        teacher([guessed])


def data(categories: dict[str, list[str]], options: Options, first: int = FIRST_MASKS) -> None:
    """Every category has training and test images, and its first masks fit their images."""
    from fbft.data import DatasetError, open_dataset

    for root, cats in categories.items():
        for cat in cats:
            try:
                for split in ("train", "test"):
                    if not len(open_dataset(root, cat, split, options.format)):
                        raise CheckError(
                            f"--data {root}: category {cat!r} has no {split} images; add them "
                            "or leave the category out with --categories"
                        )
                test = open_dataset(root, cat, "test", options.format)
                for sample in [s for s in test if s.mask_path is not None][:first]:
                    _ = sample.mask  # decodes the mask and compares it with the image's size
            except DatasetError as err:
                raise CheckError(str(err)) from None


def cache(cache_root: Path, options: Options) -> bool:
    """Whether the feature cache folder is writable; a read-only one is announced (its entries
    are used, new ones are not stored), one that cannot be used at all is an error."""
    from fbft.cache.files import READ_ONLY_ERRNOS

    if options.no_cache:
        return False
    folder = cache_root / "features"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fbft-write-test-{uuid.uuid4().hex[:8]}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
        return True
    except OSError as err:
        if err.errno in READ_ONLY_ERRNOS:
            print(
                f"cache       {folder} is read-only ({err.strerror}): cached teacher tokens are "
                "used, new ones are not stored",
                flush=True,
            )
            return False
        raise CheckError(
            f"--cache-dir {cache_root}: cannot use {folder} ({err.strerror or err}); choose a "
            "writable folder, or pass --no-cache"
        ) from None


def teacher(configs: Iterable[FBFTConfig]) -> None:
    """Build each distinct teacher (backbone, weights file) once on the CPU and drop it: a
    weights file that does not load is an error here, not in every trial."""
    from fbft.core.teacher import make_teacher

    for config in configs:
        if config.weights.startswith("random"):
            continue  # nothing to load
        key = (config.backbone, config.weights, json.dumps(config.backbone_kwargs, sort_keys=True))
        if key in _loaded:
            continue
        try:
            built = make_teacher(config)
        except (ValueError, TypeError, OSError, RuntimeError) as err:
            raise CheckError(f"--weights {config.weights}: {err}") from None
        del built
        gc.collect()
        _loaded.add(key)


def trial_configs(plan: Any) -> list[FBFTConfig]:
    """The detector config of every trial of a plan (one per distinct backbone suffices)."""
    base = plan.base.to_dict()
    seen: dict[tuple[str, str], FBFTConfig] = {}
    for cell in plan.cells:
        config = cell.config(base)
        key = (str(config["backbone"]), str(config["weights"]))
        if key not in seen:
            seen[key] = FBFTConfig(**config)
    return list(seen.values())


def _config_before_ray(options: Options) -> FBFTConfig | None:
    """The base config when it is known before the cluster is: a weights file given, and the
    preset given or decided by this machine (a remote cluster's GPUs are not known yet)."""
    if options.weights in (None, "auto", "hub", "random"):
        return None
    preset = options.preset
    if preset == "auto":
        if options.address or os.environ.get("RAY_ADDRESS"):
            return None  # checked by the driver once it has seen the cluster
        import torch

        preset = "paper" if torch.cuda.is_available() else "cpu"
    try:
        return FBFTConfig(**{**PRESETS[preset], **options.config_changes()})
    except (ValueError, TypeError):
        return None  # reported, named, by the detector checks
