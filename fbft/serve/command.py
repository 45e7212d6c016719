"""`fbft predict --model MODEL --out DIR IMAGE_OR_FOLDER...`: the command line of batch scoring.

Writes ``OUT/scores.csv`` (path, score, decision = score > threshold when a threshold is known,
and map: the image's map file), ``OUT/maps/<name>.npy`` (or ``.tiff``: the float32 map at the
image's own H×W), ``OUT/maps/<name>.png`` (image | map over the image at full resolution, jet on
the model's fixed colour scale; outlined in white at the pixel threshold when known; below, the
image score, the colour bar and the outline's meaning) and ``OUT/predict.json`` (thresholds,
colour scale). <name> is the image's path relative to the
inputs' common folder, %-escaped. OUT must be new or empty (--overwrite replaces an earlier
output); a failed run leaves none. Every error is one line, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
from pathlib import Path

from fbft.core.redact import redact
from fbft.data.common import DatasetError
from fbft.serve.batch import (
    MAP_FORMATS,
    PredictInputError,
    check_output,
    collect_images,
    predict_images,
)


def add_predict_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `fbft predict --model MODEL --out DIR IMAGE_OR_FOLDER...`."""
    parser = subparsers.add_parser(
        "predict",
        help="anomaly scores and maps for images or folders with a saved detector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER", help="images or folders")
    parser.add_argument(
        "--model",
        required=True,
        help="saved detector file (any method), MLflow model folder, or MLflow URI "
        "(runs:/ID/model, models:/NAME/V)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="image threshold (score > X is anomalous); default: the model's thresholds.json",
    )
    parser.add_argument("--format", choices=MAP_FORMATS, default="npy", help="map file format")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (16)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI, else "
        "sqlite:///mlflow.db when ./mlflow.db exists)",
    )
    parser.add_argument("--no-overlays", action="store_true", help="skip the .png overlays")
    parser.add_argument(
        "--colour-range",
        nargs=2,
        type=float,
        metavar=("LO", "HI"),
        default=None,
        help="the overlays' colour scale (default: the model's, calibrated with its thresholds)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier output in --out (not merged)"
    )
    parser.set_defaults(func=_run)
    return parser


def default_tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI, else ./mlflow.db when it exists, else None (MLflow's default)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///mlflow.db" if Path("mlflow.db").is_file() else None


def _run(args: argparse.Namespace) -> int:
    from fbft.serve.pyfunc import ModelReferenceError, load

    if args.batch_size < 1:
        return _fail(f"--batch-size must be at least 1; got {args.batch_size}")
    if args.threshold is not None and not math.isfinite(args.threshold):
        return _fail(f"--threshold must be a finite number; got {args.threshold}")
    lo, hi = args.colour_range or (0.0, 1.0)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        return _fail(f"--colour-range needs finite LO < HI; got {lo} {hi}")
    try:
        check_output(args.out, args.overwrite)
        paths = collect_images(args.inputs, exclude=[args.out])
        uri = args.tracking_uri or default_tracking_uri()
        _check_store(args.model, uri)
        model, thresholds = load(args.model, device=args.device, tracking_uri=uri)
    except (PredictInputError, DatasetError, ModelReferenceError, OSError) as err:
        return _fail(str(err))
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError) as err:
        return _fail(
            f"--model {args.model}: not a loadable fbft model ({type(err).__name__}: "
            f"{_first_line(err)}); files that carry code are refused"
        )
    try:
        csv_path = predict_images(
            model, paths, args.out, thresholds, args.threshold, args.format, args.batch_size,
            overlays=not args.no_overlays, overwrite=args.overwrite,
            colour_range=tuple(args.colour_range) if args.colour_range else None,
        )  # fmt: skip
    except (PredictInputError, DatasetError, OSError) as err:
        return _fail(f"{err}; nothing was written to {args.out}")
    print(f"scores of {len(paths)} image(s): {csv_path}")
    return 0


def _check_store(model: str, uri: str | None) -> None:
    """A runs:/ or models:/ lookup in a SQLite store that does not exist would create an empty
    database: refuse it, naming the file."""
    if Path(model).expanduser().exists() or not model.startswith(("runs:/", "models:/")):
        return
    if uri is None:
        import mlflow

        uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise PredictInputError(
            f"--model {model}: no MLflow database at {uri[len('sqlite:///') :]}; pass the "
            "--tracking-uri of the study that logged it"
        )


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def _fail(message: str) -> int:
    """One line on stderr (credentials redacted), exit status 2."""
    line = " ".join(redact(message).split())
    print(f"fbft predict: error: {line}", file=sys.stderr)
    return 2
