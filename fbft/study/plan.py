"""What a study will run, decided on the driver before any trial: the dataset roots and their
categories (the synthetic benchmark made once per category when no ``--data`` is given), the
preset from the cluster's GPUs, the base detector config with the teacher weights resolved
once, the grid's trials and the inference-side variants each trial evaluates from one fit.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fbft.core.config import PRESETS, FBFTConfig
from fbft.study import checks
from fbft.study.checks import CheckError
from fbft.study.options import Options
from fbft.study.spec import Study, show

SYNTHETIC = {"image_size": 1024, "n_train": 60, "n_test": 24, "seed": 0}


@dataclass(frozen=True)
class Plan:
    """What the checks decided: data, categories, the base detector config and the grid."""

    data: tuple[str, ...]
    synthetic: bool
    categories: dict[str, list[str]]  # per dataset root
    preset: str
    preset_reason: str
    base: FBFTConfig
    depth: int
    cells: list[dict[str, Any]]
    variants: tuple[dict[str, Any], ...]
    variant_axes: tuple[dict[str, str], ...]
    gpus_per_trial: float = 0.0  # asked of Ray by each trial (GPU intent, kept on --resume)


def make_plan(study: Study, options: Options, cache_root: Path) -> Plan:
    roots, synthetic = _data_roots(options, cache_root)
    if study.search is not None and len(roots) > 1:
        raise CheckError("a search runs on one dataset: give one --data root")
    if synthetic:  # made before its categories are read: only the ones asked for
        from fbft.data.synthetic import CATEGORIES

        unknown = sorted(set(options.categories) - set(CATEGORIES))
        if unknown:
            raise CheckError(
                f"unknown categories {unknown} in the synthetic benchmark; known: "
                f"{', '.join(CATEGORIES)}"
            )
        ensure_synthetic(Path(roots[0]), list(options.categories or CATEGORIES), SYNTHETIC)
    cats = checks.categories(roots, options)
    return Plan(tuple(roots), synthetic, cats, "", "", FBFTConfig(), 0, [], ({},), ({},))


def with_cluster(
    study: Study,
    options: Options,
    plan: Plan,
    resources: dict,
    address: Any,
    saved: dict[str, Any] | None = None,
) -> Plan:
    """Preset and GPUs per trial by intent (:mod:`fbft.study.cluster`; ``saved``: the ones a
    resumed study started with), the base config with weights resolved, checked inputs."""
    from fbft.core.teacher import resolve_weights
    from fbft.study.cluster import capacity, decide

    checks.resources(options, resources, remote=bool(address))
    intent = decide(options, capacity(resources), remote=bool(address), saved=saved)
    preset, reason = intent.preset, intent.reason
    try:
        base = FBFTConfig(**{**PRESETS[preset], **options.config_changes()})
        base = base.replace(weights=resolve_weights(base.backbone, base.weights))
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        raise CheckError(str(err)) from None
    depth = checks.detector_inputs(study, options, base)
    for root, cats in plan.categories.items():
        checks.shots(options, root, cats)
    cells = _cells(study, options, plan.categories)
    inference = study.inference_axes
    combos = list(itertools.product(*(options.axes[a.name] for a in inference))) or [()]
    variants = tuple({a.name: v for a, v in zip(inference, c, strict=True)} for c in combos)
    shown = tuple({k: show(v) for k, v in v.items()} for v in variants)
    return Plan(
        plan.data,
        plan.synthetic,
        plan.categories,
        preset,
        reason,
        base,
        depth,
        cells,
        variants,
        shown,
        intent.gpus_per_trial,
    )


def _cells(study: Study, options: Options, cats: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The grid's trials: training axes × seeds × datasets × categories (search: one template).
    The category varies fastest, so trials that run together read different images: none
    waits for another's teacher pass of the same image."""
    axes = study.training_axes
    if study.search is not None:
        ((root, names),) = cats.items()
        return [{"data": root, "categories": names, "seed": options.seeds[0], "method": "fbft",
                 "shots": "full"}]  # fmt: skip
    cells = []
    for values in itertools.product(*(options.axes[a.name] for a in axes)):
        for seed in options.seeds:
            for root, names in cats.items():
                for cat in names:
                    cell = _cell(axes, values, seed, root, cat)
                    if len(cats) > 1:
                        cell["axes"] = {"dataset": Path(root).name, **cell["axes"]}
                    cells.append(cell)
    return [{**c, "index": i} for i, c in enumerate(cells)]


def _cell(axes: Sequence[Any], values: Sequence[Any], seed: int, root: str, cat: str) -> dict:
    cell: dict[str, Any] = {"data": root, "categories": [cat], "seed": seed, "method": "fbft",
                            "shots": "full", "changes": {}, "axes": {}}  # fmt: skip
    for axis, value in zip(axes, values, strict=True):
        if axis.name in ("shots", "method"):
            cell[axis.name] = value
        else:
            cell["changes"].update(axis.config_changes(value))
        cell["axes"][axis.name] = show(value)
    cell["axes"]["seed"] = str(seed)
    return cell


def _data_roots(options: Options, cache_root: Path) -> tuple[list[str], bool]:
    if options.data:
        roots = []
        for given in options.data:
            root = Path(given).expanduser().resolve()
            if not root.is_dir():
                raise CheckError(f"--data {given}: no such folder")
            roots.append(str(root))
        return list(dict.fromkeys(roots)), False
    from fbft.data.synthetic import VERSION

    root = cache_root / "synthetic" / f"v{VERSION}-seed{SYNTHETIC['seed']}"
    print(f"no --data: the synthetic benchmark in {root} (made once per category)", flush=True)
    return [str(root)], True


def ensure_synthetic(
    root: Path, cats: list[str], params: dict[str, Any], progress: bool = True
) -> None:
    """One folder per category, made once, linked into ``root`` (only the categories asked);
    also how a worker node regenerates the driver's benchmark from its seed."""
    from fbft.data.synthetic import generate

    for cat in cats:
        link = root / cat
        if link.exists():
            continue
        part = generate(root / ".categories" / cat, categories=[cat], progress=progress, **params)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{cat}.{uuid.uuid4().hex[:6]}"
        tmp.symlink_to(part / cat, target_is_directory=True)
        tmp.replace(link)


def banner(study: Study, options: Options, plan: Plan, uri: str, cache_root: Path) -> str:
    """What this invocation will do, in a few lines a person reads before waiting."""
    from fbft.study import tracking

    base = plan.base
    weights = base.weights
    if weights.startswith("random"):
        weights = (
            "RANDOM-INIT teacher (no pretrained weights found: runs are tagged "
            "teacher_weights=random; pass --weights FILE)"
        )
    lines = [
        f"== {study.title} ==",
        f"preset      {plan.preset} ({plan.preset_reason}), {plan.gpus_per_trial:g} GPU(s) per "
        "trial"
        + ("  <- CPU preset: smaller backbone and resolution" if plan.preset == "cpu" else ""),
        f"teacher     {base.backbone} @ {base.image_size}px, blocks {base.layers[0]} and "
        f"{base.layers[1]}, weights {weights}",
        f"students    {base.epochs} epochs, lr {base.lr:g}, batch {base.batch_size} images, "
        f"loss {base.loss}",
        *(
            f"data        {root}{' (synthetic)' if plan.synthetic else ''}: {', '.join(cats)}"
            for root, cats in plan.categories.items()
        ),
        f"trials      {len(plan.cells) if not study.search else options.num_samples}"
        + (f", {len(plan.variants)} variants each from one fit" if len(plan.variants) > 1 else ""),
        f"cache       {checks.cache_line(cache_root, options)}",
        f"tables      {options.protocol} AUPRO protocol"
        + (f" ({options.num_thresholds} thresholds)" if options.protocol == "official" else ""),
        f"tracking    {tracking.redact(uri)}",
    ]
    return "\n".join(lines)
