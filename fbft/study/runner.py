"""The driver of a study (anomalib's Runner): checks, Ray Tune, progress, resume, the summary.

Everything that can be wrong with the inputs is found here, before any trial starts; the
teacher weights are resolved once, so every trial of a study uses the same teacher.
"""

from __future__ import annotations

import shlex
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from fbft.study import checks, endings, lock, preflight, recovery, report
from fbft.study.cells import CELL_KEY, varying_axes
from fbft.study.checks import CheckError
from fbft.study.options import Options
from fbft.study.plan import Plan, banner, plan_data, with_cluster
from fbft.study.spec import Study, show
from fbft.study.state import StudyState, find_state, storage_path


def run_main(study: Study, options: Options) -> int:
    """Run a parsed study; input errors print one line and give exit code 2."""
    try:
        return run(study, options)
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        lock.release_all()


def run(study: Study, options: Options) -> int:
    """Run a parsed study invocation; returns the process exit code."""
    import ray
    from ray import tune

    from fbft.cache.features import default_cache_dir
    from fbft.study import tracking
    from fbft.study.progress import Progress, quiet_ray, work_weights
    from fbft.study.shipped import ship
    from fbft.study.trial import Context, run_trial

    started = time.time()
    quiet_ray(options.verbose)
    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    try:
        client = tracking.prepare_store(uri)
    except tracking.TrackingError as err:
        raise CheckError(str(err)) from None
    storage = storage_path(options.storage)
    checks.storage_writable(storage)
    cache_root = (
        Path(options.cache_dir).expanduser().resolve() if options.cache_dir else default_cache_dir()
    )
    experiment = options.experiment or f"fbft-{study.name}"
    state = find_state(
        study, options, storage, recovery.finder(client, storage, experiment, study.name)
    )
    if state is not None:
        lock.acquire(storage, state.name)
    phases = {"time/prepare_seconds": time.time() - started}
    data = plan_data(study, options, cache_root)
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
            raise CheckError(
                f"cannot connect to the Ray cluster at {options.address}: {err}"
            ) from None
    phases["time/ray_start_seconds"] = time.time() - mark
    mark = time.time()
    saved = state.resources if state is not None else None
    plan = with_cluster(study, options, data, ray.cluster_resources(), options.address, saved)
    preflight.teacher(preflight.trial_configs(plan))
    phases["time/checks_seconds"] = time.time() - mark
    if state is None:
        name = f"{study.name}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        lock.acquire(storage, name)
        argv = [tracking.redact(a) for a in options.argv]
        resume_cmd = shlex.join(["python", study.script, *argv, "--resume", name])
        tags = {
            "preset": plan.preset,
            "preset_reason": plan.preset_reason,
            "study": study.name,
            tracking.KEY_TAG: name,
            "fbft.data": ",".join(plan.data.roots),
            tracking.NOTE_TAG: f"{study.title} (running)",
        }
        params = {"command": shlex.join(["python", study.script, *argv])}
        unused = {"axes"} | (set() if study.search else {"asha", "num_samples", "metric"})
        params.update({k: show(v) for k, v in options.comparable().items() if k not in unused})
        params.update({k: show(v) for k, v in options.axes.items()})
        shown = tracking.parent_run_name(study.name, plan.data.roots, plan.data.synthetic, name)
        parent = tracking.start_parent_run(client, experiment, shown, params, tags)
        state = StudyState(
            name=name,
            parent_run_id=parent,
            tracking_uri=tracking.redact(uri),
            resume_command=resume_cmd,
            options=options.comparable(),
            started=started,
            resources={
                "preset": plan.preset,
                "reason": plan.preset_reason,
                "gpus_per_trial": plan.gpus_per_trial,
            },
        )
        state.write(storage)
        recovery.save(client, state)
    else:
        name = state.name
        if state.tracking_uri != tracking.redact(uri):
            raise CheckError(
                f"--resume {name}: the study is tracked in {state.tracking_uri}, not in "
                f"{tracking.redact(uri)}; pass its --tracking-uri"
            )
    print(banner(study, options, plan, uri, cache_root), flush=True)
    invocation = uuid.uuid4().hex[:12]
    context = Context(
        base_config=plan.base.to_dict(),
        variant_axes=plan.variant_axes,
        tracking_uri=uri,
        parent_run_id=state.parent_run_id,
        invocation=invocation,
        cpus_per_trial=options.cpus_per_trial,
        settings=_job_settings(options, plan, cache_root),
        tags={"preset": plan.preset, "study": study.name},
        metric=options.metric if study.search else None,
        varying=varying_axes(plan.cells),
        shipped=ship(plan, cache_root, cache_given=bool(options.cache_dir)),
    )
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        {"cpu": options.cpus_per_trial, "gpu": plan.gpus_per_trial},
    )
    path = f"{storage}/{name}"
    total = options.num_samples if study.search else len(plan.cells)
    progress = Progress(total, work_weights(plan.cells, plan.base))
    if options.resume and tune.Tuner.can_restore(path):
        print(f"resuming {name}", flush=True)
        tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
    else:
        tuner = _tuner(
            study, options, plan, trainable, storage=storage, name=name, progress=progress
        )
    mark = time.time()
    client.update_run(state.parent_run_id, "RUNNING")  # reopened by a --resume
    with endings.sigterm_as_sigint() as stop:
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:
            grid = None
        except Exception as err:  # Ray/Tune: the trials' causes, the resume command, no RUNNING
            lines = endings.crash_lines(
                err, endings.saved_failures(path, trainable), options.max_failures
            )
            print("\nerror: " + "\n       ".join(lines), file=sys.stderr, flush=True)
            endings.close_children(client, state.parent_run_id)
            endings.close_parent(client, state.parent_run_id, "FAILED", lines[0])
            print(f"the study is saved in {path}\nresume with: {state.resume_command}", flush=True)
            return 1
    phases["time/trials_seconds"] = time.time() - mark
    endings.close_children(client, state.parent_run_id)
    outcome = report.collect(grid, plan.variant_axes)
    for line in endings.causes(outcome.failures, options.max_failures, infrastructure=True):
        print(f"[fbft] {line}", flush=True)
    lost = recovery.vanished(client, storage, state)
    if outcome.finished + len(outcome.failures) < total:
        print(
            f"\ninterrupted: {outcome.finished + len(outcome.failures)} of {total} trials "
            f"finished; the study is saved in {path}\nresume with: {state.resume_command}",
            flush=True,
        )
        endings.close_parent(client, state.parent_run_id, "KILLED", "interrupted")
        return stop.exit_code
    code = report.summarise(
        study, options, outcome, state=state, path=path, started=started, uri=uri, phases=phases
    )
    return recovery.verdict(code, lost, state)


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
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
    )
    if study.search is not None:
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search.optuna import OptunaSearch

        space = {**study.search.space(plan.depth), CELL_KEY: plan.cells[0]}
        scheduler = None
        if options.asha:
            scheduler = ASHAScheduler(
                time_attr="categories_done", max_t=len(plan.cells[0].categories), grace_period=1
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
        space = {CELL_KEY: tune.grid_search(list(plan.cells))}
        tune_config = tune.TuneConfig(max_concurrent_trials=options.max_concurrent)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)


def _job_settings(options: Options, plan: Plan, cache_root: Path) -> Any:
    from fbft.study.job import JobSettings

    return JobSettings(
        format=options.format,
        nested=options.nested,
        variants=plan.variants,
        cache_dir=None if options.no_cache else str(cache_root / "features"),
        cache_dtype=options.cache_dtype,
        cache_max_gb=options.cache_max_gb,
        num_thresholds=options.num_thresholds,
        protocol=options.protocol,
        pictures=options.pictures,
        target_fpr=options.target_fpr,
        log_teacher=options.log_teacher,
        teacher_per_epoch=options.teacher_per_epoch,
        baseline_preset=options.baseline_preset,
    )
