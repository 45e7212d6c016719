"""A saved detector (any registered method) as an MLflow pyfunc model, and loading a detector
from a file or a URI.

The model's artifacts are the saved detector (``detector.pt``), optionally ``thresholds.json``
and, only with ``log_teacher=True``, the teacher's weights file. Otherwise the teacher is
referenced, not copied: the saved file names the teacher (a random-init teacher is rebuilt from
its seed; a file teacher is read from its recorded path, checked by SHA-256 at load).
The model is MLflow's models-from-code: its code is :mod:`fbft.serve.model_code`, given by path
(nothing is pickled). Requirements are pinned to this environment and the fbft modules the model
imports travel with it (``code_paths``: :mod:`fbft.serve.package` says which and why), so
loading installs nothing and works offline. The request and answer: :mod:`fbft.serve.frame`.

mlflow and torch are imported on first use: ``import fbft.serve.pyfunc`` is cheap.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fbft.serve.thresholds import Thresholds

if TYPE_CHECKING:
    from fbft.detectors.base import BaseDetector

DETECTOR, THRESHOLDS, TEACHER = "detector", "thresholds", "teacher_weights"
REQUIREMENTS = (
    "mlflow", "torch", "timm", "numpy", "pandas", "pillow", "scipy", "scikit-image", "tqdm",
)  # fmt: skip
MODEL_CODE = Path(__file__).resolve().with_name("model_code.py")  # MLflow models-from-code
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


class ModelReferenceError(FileNotFoundError):
    """A model file, folder or MLflow URI that cannot be found or read."""


def signature(with_decision: bool) -> Any:
    """Inputs ``image`` (file bytes: base64 in JSON) or ``path``; params ``maps`` and
    ``map_size``; outputs as :mod:`fbft.serve.frame` writes them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    region = Object(
        [Property(n, "long") for n in ("x", "y", "width", "height", "area")]
        + [Property("peak", "double")]
    )
    inputs = Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", False)])
    outputs = [ColSpec("string", "path", required=False), ColSpec("double", "score")]
    outputs += [ColSpec("boolean", "decision")] if with_decision else []
    outputs += [
        ColSpec("long", "height", required=False),
        ColSpec("long", "width", required=False),
        ColSpec(Array(Array("double")), "anomaly_map", required=False),
        ColSpec("long", "map_scale", required=False),
        ColSpec(Array(region), "components", required=False),
        ColSpec("long", "n_components", required=False),
    ]
    params = ParamSchema([ParamSpec("maps", "boolean", False), ParamSpec("map_size", "long", 256)])
    return ModelSignature(inputs, Schema(outputs), params)


@contextmanager
def quiet_artifacts() -> Iterator[None]:
    """MLflow's artifact progress bar off while its stream (stderr) is not a terminal: in a log
    each update is a line, one per file. ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR``, when set,
    decides."""
    if PROGRESS_BAR_ENV in os.environ or sys.stderr.isatty():
        yield
        return
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_BAR_ENV, None)


def requirements() -> list[str]:
    """This environment's versions of what the model imports (no resolution, no install)."""
    pinned = []
    for name in REQUIREMENTS:
        try:
            pinned.append(f"{name}=={package_metadata.version(name)}")
        except package_metadata.PackageNotFoundError:
            continue
    return pinned


def log_model(
    model_file: str | os.PathLike[str],
    thresholds: Thresholds | str | os.PathLike[str] | None = None,
    name: str = "model",
    teacher_weights_file: str | os.PathLike[str] | None = None,
    log_teacher: bool = False,
) -> str:
    """Log a saved detector as an MLflow pyfunc model in the active run (or a new one).

    Returns ``runs:/<run id>/<name>``. ``teacher_weights_file`` is recorded in the model's
    metadata, and copied as an artifact only with ``log_teacher=True`` (default: the weights
    file the detector was configured with).
    """
    import mlflow

    from fbft.serve import package

    model_file = Path(model_file)
    teacher = _teacher_reference(model_file, teacher_weights_file)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {DETECTOR: str(shutil.copyfile(model_file, Path(tmp) / "detector.pt"))}
        if thresholds is not None:
            if not isinstance(thresholds, Thresholds):
                thresholds = Thresholds.load(thresholds)
            artifacts[THRESHOLDS] = str(thresholds.save(Path(tmp) / "thresholds.json"))
        if log_teacher:
            weights = teacher.get("weights_file")
            if not weights or not Path(weights).is_file():
                raise ModelReferenceError(
                    f"log_teacher=True needs the teacher weights file; {weights!r} is not one "
                    "(pass teacher_weights_file=PATH)"
                )
            artifacts[TEACHER] = weights
        metadata = {"method": teacher.pop("method"), "teacher": teacher}
        metadata["thresholds"] = None if thresholds is None else asdict(thresholds)
        active = mlflow.active_run()
        with nullcontext(active) if active else mlflow.start_run() as run, quiet_artifacts():
            mlflow.pyfunc.log_model(
                name=name,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                signature=signature(thresholds is not None),
                pip_requirements=requirements(),
                code_paths=[str(package.stage(Path(tmp) / "code"))],
                metadata=metadata,
            )
    return f"runs:/{run.info.run_id}/{name}"


def _teacher_reference(model_file: Path, weights_file: str | os.PathLike[str] | None) -> dict:
    """The method and teacher identity from the saved file's header, plus where the teacher's
    weights file lives; a detector that records no teacher cannot score images."""
    from fbft.detectors.saved import read_detector

    try:
        saved = read_detector(model_file)
    except (FileNotFoundError, ValueError) as err:
        raise ModelReferenceError(str(err)) from err
    record = saved.teacher or {}
    if not record.get("config"):
        raise ModelReferenceError(
            f"{model_file}: the {saved.method} detector records no teacher to read images with "
            "(fitted on tokens alone); fit it with a teacher (fbft.detectors.create_detector)"
        )
    ref = {"method": saved.method, "identity": record["identity"]}
    configured = record["config"].get("weights")
    if weights_file is None and configured not in (None, "auto", "hub", "random"):
        weights_file = configured
    if weights_file is not None:
        ref["weights_file"] = str(Path(weights_file).expanduser().resolve())
    return ref


def load(
    uri_or_path: str | os.PathLike[str], device: str | None = None, tracking_uri: str | None = None
) -> tuple[BaseDetector, Thresholds | None]:
    """The detector and its thresholds (None when not logged) from a saved file, a local MLflow
    model folder, or an MLflow URI (``runs:/ID/model``, ``models:/NAME/VERSION``, ...)."""
    ref = str(uri_or_path)
    local = Path(ref).expanduser()
    if local.is_file():
        return load_artifacts({DETECTOR: str(local)}, device)
    if local.is_dir():
        return load_artifacts(_artifacts_of(local), device)
    if ":" not in ref or len(ref.split(":", 1)[0]) < 2:  # no scheme (or a Windows drive)
        raise ModelReferenceError(
            f"no saved detector at {ref!r}: not a file, folder or MLflow URI "
            "(runs:/RUN_ID/model, models:/NAME/VERSION)"
        )
    import mlflow
    from mlflow.exceptions import MlflowException

    previous = mlflow.get_tracking_uri()
    try:
        # MLflow 3 resolves runs:/ID/model (a logged model) through the global tracking URI,
        # whatever tracking_uri says: point it there for the download only.
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        with quiet_artifacts():
            folder = mlflow.artifacts.download_artifacts(
                artifact_uri=ref, tracking_uri=tracking_uri, registry_uri=tracking_uri
            )
    except (MlflowException, OSError) as err:
        where = tracking_uri or mlflow.get_tracking_uri()
        raise ModelReferenceError(
            f"cannot fetch MLflow model {ref!r} from tracking server {where!r}: {err}. "
            "Check the URI and --tracking-uri / MLFLOW_TRACKING_URI."
        ) from err
    finally:
        mlflow.set_tracking_uri(previous)
    return load_artifacts(_artifacts_of(Path(folder)), device)


def load_detector(
    uri_or_path: str | os.PathLike[str], device: str | None = None, tracking_uri: str | None = None
) -> BaseDetector:
    """The detector alone; see :func:`load`."""
    return load(uri_or_path, device, tracking_uri)[0]


def _artifacts_of(folder: Path) -> dict[str, str]:
    """Artifact name -> local file of an MLflow model folder written by :func:`log_model`."""
    from mlflow.models import Model

    try:
        conf = Model.load(str(folder)).flavors["python_function"]
    except (OSError, KeyError) as err:
        raise ModelReferenceError(f"{folder} is not an MLflow pyfunc model folder") from err
    entries = conf.get("artifacts", {})
    if DETECTOR not in entries:
        raise ModelReferenceError(f"{folder}: the MLflow model has no fbft detector artifact")
    return {key: str(folder / entry["path"]) for key, entry in entries.items()}


def load_artifacts(
    artifacts: dict[str, str], device: str | None
) -> tuple[BaseDetector, Thresholds | None]:
    """The detector (any registered method, by the method its file records) and thresholds
    of a pyfunc model's artifacts."""
    from fbft.detectors.registry import load_detector as load_saved

    try:
        detector = load_saved(artifacts[DETECTOR], device=device, weights=artifacts.get(TEACHER))
        found = artifacts.get(THRESHOLDS)
        return detector, Thresholds.load(found) if found else None
    except (FileNotFoundError, ValueError) as err:
        raise ModelReferenceError(str(err)) from err
