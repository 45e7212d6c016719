"""What a study prints and leaves behind: the table (means over categories, ± std over seeds),
the CSV of every trial and variant, a plot, and the parent run's description and totals."""

from __future__ import annotations

import contextlib
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fbft.detectors.registry import DEFAULT_METHOD
from fbft.metrics.keys import OFFICIAL_PREFIX
from fbft.study.cells import Cell, run_key
from fbft.study.options import Options
from fbft.study.spec import Study

TOTALS = ("cache/teacher_passes", "student_fits")
RUN_KEY = "fbft.trial_id"  # a row's child-run key (the tag of the same name), until run ids
_VARIANT = re.compile(r"v\d+/")


@dataclass
class Collected:
    """Rows (one per finished trial × variant), failures, and how many trials finished."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    finished: int = 0


def collect(grid: Any, variant_axes: tuple[dict, ...]) -> Collected:
    """Tune's results as table rows. A trial counts as finished only when it reported its
    metrics: Ray marks trials it never started TERMINATED when a study is interrupted."""
    from fbft.study.progress import describe

    out = Collected()
    if grid is None:
        return out
    for result in grid:
        config = result.config or {}
        if result.error is not None:
            cause = getattr(result.error, "cause", None) or result.error
            text = f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
            out.failures.append((describe(config), text.replace("TrialError: ", "")))
            continue
        metrics = result.metrics or {}
        if "categories_done" not in metrics:
            continue
        out.finished += 1
        cell = Cell.of(config)
        setting = {**cell.axes, **cell.sampled}
        for i, shown in enumerate(variant_axes):
            prefix = f"v{i}/" if i else ""
            row = {**setting, **shown, "method": cell.method}
            row["categories"] = ",".join(cell.categories)
            row[RUN_KEY] = run_key(cell, metrics.get("trial_id", "")) + (
                f"/{i}" if len(variant_axes) > 1 else ""
            )
            if i:  # the fit's counters count once, on variant 0's row
                found = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
                row.update({k: v for k, v in found.items() if k not in TOTALS})
            else:
                row.update({k: v for k, v in metrics.items() if not _VARIANT.match(k)})
            row.update({k: metrics[k] for k in TOTALS if k in metrics and i == 0})
            out.rows.append(row)
    return out


def table(study: Study, options: Options, rows: list[dict[str, Any]]) -> tuple[str, Any]:
    """The paper-style Markdown table and the DataFrame of its means."""
    import pandas as pd

    if not rows:
        return "(no finished trial)", None
    prefix = OFFICIAL_PREFIX if options.protocol == "official" else ""
    columns = {
        (prefix + k if k.startswith(("aupro_", "rho_")) else k): name
        for k, name in study.columns.items()
    }
    df = pd.DataFrame(rows)
    if study.search is not None:
        return _search_table(df, options, columns), df
    keys = (["dataset"] if _varies(df, "dataset") else []) + [a.name for a in study.axes]
    keys += ["method"] if _varies(df, "method") else []
    keys = [k for k in dict.fromkeys(keys) if k in df]
    for col in columns:
        if col not in df:
            df[col] = np.nan
    # per seed: the mean over categories; then mean ± std over seeds
    per_seed = df.groupby([*keys, "seed"], sort=False, dropna=False)[list(columns)].mean()
    grouped = (
        per_seed.groupby(level=keys, sort=False, dropna=False)
        if keys
        else per_seed.groupby(lambda _: 0)
    )
    mean, std, count = grouped.mean(), grouped.std(ddof=1), grouped.size()
    trials = df.groupby(keys, sort=False, dropna=False).size() if keys else pd.Series([len(df)])
    head = [*keys, *columns.values(), "trials"]
    body = []
    for index in mean.index:
        values = index if isinstance(index, tuple) else (index,)
        cells = [str(v) for v in values] if keys else []
        for col in columns:
            m, s = mean.loc[index, col], std.loc[index, col]
            cells.append(
                _fmt(m) + (f" ± {s:.3f}" if count.loc[index] > 1 and np.isfinite(s) else "")
            )
        cells.append(str(int(trials.loc[index])) if keys else str(len(df)))
        body.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    seeds = df["seed"].nunique() if "seed" in df else 1
    spread = f"; ± = std over {seeds} seeds" if seeds > 1 else ""
    note = (
        f"{options.protocol} AUPRO protocol"
        + (f" ({options.num_thresholds} thresholds)" if prefix else "")
        + f"; means over categories{spread}; host {socket.gethostname()}"
        + (f"; baselines: {options.baseline_preset} preset" if _baselines(df) else "")
    )
    for col in columns:  # for the summary plot's error bars (NaN with one seed)
        mean[f"{col}_std"] = std[col]
    return "\n".join(lines) + f"\n\n({note})", mean.reset_index() if keys else mean


def _baselines(df: Any) -> bool:
    """Whether the table shows a method other than FBFT (its preset is then named under it)."""
    return "method" in df and bool((df["method"] != DEFAULT_METHOD).any())


def _varies(df: Any, key: str) -> bool:
    return key in df and df[key].nunique() > 1


def _search_table(df: Any, options: Options, columns: dict[str, str]) -> str:
    from fbft.core.config import FBFTConfig

    ranked = df.sort_values(options.metric, ascending=False, na_position="last").head(10)
    params = [k for k in df.columns if k in FBFTConfig.__dataclass_fields__ and k != "seed"]
    head = ["rank", *params, *columns.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for i, (_, r) in enumerate(ranked.iterrows(), 1):
        cells = [str(i), *(_param(r[p]) for p in params), *(_fmt(r.get(c)) for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(best by {options.metric}; {options.protocol} protocol)"


def _param(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _fmt(value: Any) -> str:
    """Three decimals for scores, fewer digits for larger numbers (ms, seconds); the CSV keeps
    every digit."""
    try:
        if value is None or not np.isfinite(value):
            return "n/a"
    except TypeError:
        return str(value)
    return (
        f"{value:.3f}"
        if abs(value) < 10
        else f"{value:.1f}"
        if abs(value) < 1000
        else f"{value:.0f}"
    )


def trials_frame(client: Any, parent: str, rows: list[dict[str, Any]]) -> Any:
    """trials.csv: one row per trial and variant with its MLflow run id, no Ray internals."""
    import pandas as pd
    from ray.tune.result import AUTO_RESULT_KEYS

    from fbft.study import tracking

    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent}'",
        max_results=5000,
    )
    ids = {r.data.tags.get(tracking.TRIAL_TAG): r.info.run_id for r in runs}
    frame = pd.DataFrame(rows)
    if RUN_KEY in frame:
        frame.insert(0, "run_id", [ids.get(k, "") for k in frame.pop(RUN_KEY)])
    internal = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "categories_done"}
    return frame.drop(columns=[c for c in frame if c in internal])


def summarise(
    study: Study,
    options: Options,
    found: Collected,
    *,
    state: Any,
    path: str,
    started: float,
    uri: str,
    phases: dict[str, float] | None = None,
) -> int:
    """Print the table; write summary.md, trials.csv and summary.png; finish the parent run."""
    from mlflow.tracking import MlflowClient

    from fbft import plots
    from fbft.study import tracking

    text, means = table(study, options, found.rows)
    wall = time.time() - started
    client = MlflowClient(uri)
    parent = state.parent_run_id
    with contextlib.ExitStack() as stack:
        if "://" in path:  # remote storage: the summary goes to MLflow only
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fbft-summary-")))
        else:
            out = Path(path) / "summary"
            out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text(f"# {study.title}\n\n{text}\n")
        trials_frame(client, parent, found.rows).to_csv(out / "trials.csv", index=False)
        keys = [a.name for a in study.axes]
        if study.search is None and means is not None and len(means) > 1 and keys:
            rows = means.to_dict("records")
            shown = [k for k in keys if k in means]
            for r in rows:
                r["setting"] = " · ".join(str(r[k]) for k in shown)
            prefix = OFFICIAL_PREFIX if options.protocol == "official" else ""
            cols = {
                (prefix + k if k.startswith(("aupro_", "rho_")) else k): v
                for k, v in study.columns.items()
                if k.startswith(("aupro_", "rho_", "i_auroc", "p_auroc"))
            }
            plots.summary(rows, "setting", cols, out / "summary.png", xlabel=" · ".join(shown),
                          protocol=options.protocol)  # fmt: skip
        client.log_artifacts(parent, str(out))
    totals = {k: float(sum(r.get(k, 0.0) for r in found.rows)) for k in TOTALS}
    counts: dict[str, float] = {}  # the run page lists metrics in logging order: means first
    if means is not None and study.search is None:
        for r in means.to_dict("records"):
            label = "_".join(f"{k}_{r[k]}" for k in [a.name for a in study.axes] if k in r)
            label = re.sub(r"[^\w\-. ]", "-", label) or "all"
            counts.update(
                {f"{label}/{c}": r[c] for c in r if isinstance(r[c], float) and np.isfinite(r[c])}
            )
    counts.update({
        "trials_done": found.finished,
        "trials_failed": len(found.failures),
        "teacher_passes": totals["cache/teacher_passes"],
        "student_fits": totals["student_fits"],
        **(phases or {}),
        "time/wall_seconds": wall,
    })  # fmt: skip
    tracking.log_metrics(client, parent, counts)
    tracking.set_tags(client, parent, {tracking.NOTE_TAG: f"# {study.title}\n\n{text}\n"})
    client.set_terminated(parent, "FAILED" if found.failures and not found.rows else "FINISHED")
    print(f"\n{study.title}\n\n{text}")
    if found.failures:
        print(f"\n{len(found.failures)} trial(s) failed:")
        for where, error in found.failures:
            print(f"  {where}: {error}")
        print(f"re-run the failed trials with: {state.resume_command}")
    where = path if "://" in path else f"{path} (table: {path}/summary/summary.md)"
    print(
        f"\nwall time {_duration(wall)} · teacher passes {int(totals['cache/teacher_passes'])} · "
        f"student fits {int(totals['student_fits'])} · results in {where}"
    )
    info = client.get_run(parent).info
    for line in tracking.ui_lines(uri, info.experiment_id):
        print(line)
    experiment = client.get_experiment(info.experiment_id).name
    print(f"        experiment '{experiment}', run '{info.run_name}' (--resume {state.name})")
    if options.register and found.rows:
        _register(client, options, study, state=state, uri=uri)
    return 1 if found.failures else 0


def _duration(seconds: float) -> str:
    from fbft.study.progress import duration

    return duration(seconds)


def _register(client: Any, options: Options, study: Study, *, state: Any, uri: str) -> None:
    """Register, per dataset and category, the model of the child run with the best table
    metric in that category (a search: the best trial over all categories), as versions of
    ``--register NAME`` tagged with what a reader of the registry needs to trust them."""
    import mlflow

    from fbft.study import tracking

    prefix = OFFICIAL_PREFIX if options.protocol == "official" else ""
    metric = options.metric if study.search else prefix + "aupro_5"
    experiment = client.get_run(state.parent_run_id).info.experiment_id
    children = client.search_runs(
        [experiment],
        filter_string=f"tags.`mlflow.parentRunId` = '{state.parent_run_id}'",
        order_by=[f"metrics.`{metric}` DESC"],
        max_results=5000,
    )
    with_model = {r.info.run_id for r in children if tracking.MODEL_TAG in r.data.tags}
    best: dict[tuple[str, str], Any] = {}
    for run in children:  # best first
        tags = run.data.tags
        if tags.get("fit_run", run.info.run_id) not in with_model or metric not in run.data.metrics:
            continue
        group = ("", "all") if study.search else (tags.get("dataset", ""), tags.get("category", ""))
        best.setdefault(group, run)
    if not best:
        print("--register: no finished child run with a model to register")
        return
    mlflow.set_tracking_uri(uri)
    print(f"registered under {options.register} (best {metric} per category):")
    for (dataset, category), run in sorted(best.items()):
        tags = run.data.tags
        value = run.data.metrics[metric]
        model_run = tags.get("fit_run", run.info.run_id)
        teacher = tags.get("teacher_weights", "?")
        version_tags = {
            "dataset": dataset or "-",
            "category": category,
            "metric": metric,
            "value": repr(value),
            "protocol": options.protocol,
            "method": tags.get("method", "?"),
            "teacher_weights": teacher,
            "study": state.name,
            "run": run.info.run_id,
        }
        version = mlflow.register_model(f"runs:/{model_run}/model", options.register,
                                        tags=version_tags)  # fmt: skip
        loud = " — RANDOM-INIT TEACHER: not a trained detector" if teacher == "random" else ""
        description = (
            f"{tags.get('method', '?')} detector for {category} ({dataset or 'data'}), best "
            f"{metric} = {value:.4f} ({options.protocol} protocol) in study {state.name}; run "
            f"{run.info.run_name}. Teacher weights: {teacher}{loud}."
        )
        client.update_model_version(options.register, version.version, description=description)
        print(f"  models:/{options.register}/{version.version}  {category}: {metric} {value:.4f}"
              f"{loud}")  # fmt: skip
