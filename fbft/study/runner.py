"""The driver of a study (anomalib's Runner): checks, Ray Tune, progress, resume, the summary.

Everything that can be wrong with the inputs is found here, before any trial starts; the
teacher weights are resolved once, so every trial of a study uses the same teacher.
"""

from __future__ import annotations

import itertools
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fbft.config import PRESETS, FBFTConfig
from fbft.study import checks, report
from fbft.study.options import Options
from fbft.study.spec import Study, show
from fbft.study.state import StudyState, find_state, storage_path

SYNTHETIC = {"image_size": 1024, "n_train": 60, "n_test": 24, "seed": 0}


class StudyError(Exception):
    """A problem with the study's inputs, reported without a traceback (exit 2)."""


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


def run_main(study: Study, options: Options) -> int:
    """Run a parsed study; input errors print one line and give exit code 2."""
    try:
        return run(study, options)
    except (StudyError, checks.CheckError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(study: Study, options: Options) -> int:
    """Run a parsed study invocation; returns the process exit code."""
    import ray
    from ray import tune

    from fbft import tracking
    from fbft.features import default_cache_dir
    from fbft.study.progress import Progress, quiet_ray
    from fbft.study.trial import Context, run_trial

    started = time.time()
    quiet_ray(options.verbose)
    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    try:
        client = tracking.prepare_store(uri)
    except tracking.TrackingError as err:
        raise StudyError(str(err)) from None
    storage = storage_path(options.storage)
    checks.storage_writable(storage)
    cache_root = (
        Path(options.cache_dir).expanduser().resolve() if options.cache_dir else default_cache_dir()
    )
    state = find_state(study, options, storage)
    phases = {"time/prepare_seconds": time.time() - started}
    plan = _plan(study, options, cache_root)
    phases["time/data_seconds"] = time.time() - started - phases["time/prepare_seconds"]
    mark = time.time()
    if not ray.is_initialized():
        try:
            ray.init(
                address=options.address,
                include_dashboard=False,
                log_to_driver=options.verbose,
                logging_level="WARNING" if not options.verbose else "INFO",
            )
        except (ConnectionError, RuntimeError) as err:
            raise StudyError(
                f"cannot connect to the Ray cluster at {options.address}: {err}"
            ) from None
    phases["time/ray_start_seconds"] = time.time() - mark
    mark = time.time()
    plan = _with_cluster(study, options, plan, ray.cluster_resources(), options.address)
    phases["time/checks_seconds"] = time.time() - mark
    experiment = options.experiment or f"fbft-{study.name}"
    if state is None:
        name = f"{study.name}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        argv = [tracking.redact(a) for a in options.argv]
        resume_cmd = shlex.join(["python", study.script, *argv, "--resume", name])
        tags = {
            "preset": plan.preset,
            "preset_reason": plan.preset_reason,
            "study": study.name,
            "fbft.data": ",".join(plan.data),
            tracking.NOTE_TAG: f"{study.title} (running)",
        }
        params = {"command": shlex.join(["python", study.script, *argv])}
        params.update({k: show(v) for k, v in options.comparable().items() if k != "axes"})
        params.update({k: show(v) for k, v in options.axes.items()})
        parent = tracking.start_parent_run(client, experiment, name, params, tags)
        state = StudyState(
            name=name,
            parent_run_id=parent,
            tracking_uri=tracking.redact(uri),
            resume_command=resume_cmd,
            options=options.comparable(),
            started=started,
        )
        state.write(storage)
    else:
        name = state.name
        if state.tracking_uri != tracking.redact(uri):
            raise StudyError(
                f"--resume {name}: the study is tracked in {state.tracking_uri}, not in "
                f"{tracking.redact(uri)}; pass its --tracking-uri"
            )
    print(_banner(study, options, plan, uri, cache_root), flush=True)
    invocation = uuid.uuid4().hex[:12]
    context = Context(
        base_config=plan.base.to_dict(),
        variants=plan.variants,
        variant_axes=plan.variant_axes,
        tracking_uri=uri,
        parent_run_id=state.parent_run_id,
        invocation=invocation,
        cpus_per_trial=options.cpus_per_trial,
        job=_job(options, plan, cache_root),
        tags={"preset": plan.preset, "study": study.name},
        metric=options.metric if study.search else None,
    )
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_trial = options.gpus_per_trial if options.gpus_per_trial is not None else min(1.0, gpus)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": options.cpus_per_trial, "gpu": per_trial},
    )
    path = f"{storage}/{name}"
    total = options.num_samples if study.search else len(plan.cells)
    progress = Progress(total, report.work_weights(plan.cells, plan.base))
    if options.resume and tune.Tuner.can_restore(path):
        print(f"resuming {name}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = _tuner(
            study, options, plan, trainable, storage=storage, name=name, progress=progress
        )
    mark = time.time()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        grid = None
    phases["time/trials_seconds"] = time.time() - mark
    outcome = report.collect(grid, plan.variants, plan.variant_axes)
    if outcome.finished + len(outcome.failures) < total:
        print(
            f"\ninterrupted: {outcome.finished + len(outcome.failures)} of {total} trials "
            f"finished; the study is saved in {path}\nresume with: {state.resume_command}",
            flush=True,
        )
        return 130
    return report.summarise(
        study, options, outcome, state=state, path=path, started=started, uri=uri, phases=phases
    )


def _plan(study: Study, options: Options, cache_root: Path) -> Plan:
    roots, synthetic = _data_roots(options, cache_root)
    if study.search is not None and len(roots) > 1:
        raise StudyError("a search runs on one dataset: give one --data root")
    cats = checks.categories(roots, options)
    if synthetic:
        _ensure_synthetic(Path(roots[0]), cats[roots[0]])
    return Plan(tuple(roots), synthetic, cats, "", "", FBFTConfig(), 0, [], ({},), ({},))


def _with_cluster(
    study: Study, options: Options, plan: Plan, resources: dict, address: Any
) -> Plan:
    """Preset by the cluster's GPUs, the base config with weights resolved, checked inputs."""
    from fbft.teacher import resolve_weights

    checks.resources(options, resources, remote=bool(address))
    gpus = float(resources.get("GPU", 0))
    if options.preset != "auto":
        preset, reason = options.preset, f"--preset {options.preset}"
    elif gpus > 0:
        preset, reason = "paper", f"{gpus:g} GPU(s) in the Ray cluster"
    else:
        preset, reason = "cpu", "no GPU in the Ray cluster"
    try:
        base = FBFTConfig(**{**PRESETS[preset], **options.config_changes()})
        base = base.replace(weights=resolve_weights(base.backbone, base.weights))
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        raise StudyError(str(err)) from None
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


def _tuner(
    study: Study,
    options: Options,
    plan: Plan,
    trainable: Any,
    *,
    storage: str,
    name: str,
    progress: Any,
) -> Any:
    from ray import tune

    run_config = tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=[progress],
        verbose=0,
        failure_config=tune.FailureConfig(max_failures=1),
    )
    if study.search is not None:
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        space = {**study.search.space(plan.depth), "trial": plan.cells[0]}
        scheduler = None
        if options.asha:
            scheduler = ASHAScheduler(
                time_attr="categories_done", max_t=len(plan.cells[0]["categories"]), grace_period=1
            )
        tune_config = tune.TuneConfig(
            metric=options.metric,
            mode="max",
            num_samples=options.num_samples,
            search_alg=OptunaSearch(seed=options.seeds[0]),
            scheduler=scheduler,
            max_concurrent_trials=options.max_concurrent,
        )
    else:
        space = {"trial": tune.grid_search(plan.cells)}
        tune_config = tune.TuneConfig(max_concurrent_trials=options.max_concurrent)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _job(options: Options, plan: Plan, cache_root: Path) -> Any:
    from fbft.study.job import Job

    return Job(
        data="",
        format=options.format,
        category="",
        method="fbft",
        config={},
        shots="full",
        seed=0,
        nested=options.nested,
        variants=plan.variants,
        cache_dir=None if options.no_cache else str(cache_root / "features"),
        cache_dtype=options.cache_dtype,
        cache_max_gb=options.cache_max_gb,
        num_thresholds=options.num_thresholds,
        pictures=options.pictures,
        target_fpr=options.target_fpr,
        log_teacher=options.log_teacher,
        teacher_per_epoch=options.teacher_per_epoch,
    )


def _data_roots(options: Options, cache_root: Path) -> tuple[list[str], bool]:
    if options.data:
        roots = []
        for given in options.data:
            root = Path(given).expanduser().resolve()
            if not root.is_dir():
                raise StudyError(f"--data {given}: no such folder")
            roots.append(str(root))
        return list(dict.fromkeys(roots)), False
    from fbft.data.synthetic import VERSION

    root = cache_root / "synthetic" / f"v{VERSION}-seed{SYNTHETIC['seed']}"
    print(f"no --data: the synthetic benchmark in {root} (made once per category)", flush=True)
    return [str(root)], True


def _ensure_synthetic(root: Path, cats: list[str]) -> None:
    """One folder per category, made once, linked into ``root`` (only the categories asked)."""
    from fbft.data.synthetic import generate

    for cat in cats:
        link = root / cat
        if link.exists():
            continue
        part = generate(root / ".categories" / cat, categories=[cat], progress=True, **SYNTHETIC)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{cat}.{uuid.uuid4().hex[:6]}"
        tmp.symlink_to(part / cat, target_is_directory=True)
        tmp.replace(link)


def _banner(study: Study, options: Options, plan: Plan, uri: str, cache_root: Path) -> str:
    """What this invocation will do, in a few lines a person reads before waiting."""
    from fbft import tracking

    base = plan.base
    weights = base.weights
    if weights.startswith("random"):
        weights = (
            "RANDOM-INIT teacher (no pretrained weights found: runs are tagged "
            "teacher_weights=random; pass --weights FILE)"
        )
    lines = [
        f"== {study.title} ==",
        f"preset      {plan.preset} ({plan.preset_reason})"
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
