"""`fbft predict --model MODEL --out DIR IMAGE_OR_FOLDER...`: the command line of batch scoring.

Writes ``OUT/scores.csv`` (path, score and, when a threshold is known, decision = score >
threshold), ``OUT/maps/<name>.npy`` (or ``.tiff``: the float32 map at the image's own H×W),
``OUT/maps/<name>.png`` (image | map over the image at full resolution, jet on one colour scale
for every image; outlined in white at the pixel threshold when known) and ``OUT/predict.json``
(thresholds, colour scale). Images stream in batches: a folder of thousands never holds more
than one batch of maps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fbft.data.common import DatasetError
from fbft.serve.batch import MAP_FORMATS, PredictInputError, collect_images, predict_images


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
    try:
        paths = collect_images(args.inputs)
        model, thresholds = load(
            args.model, device=args.device, tracking_uri=args.tracking_uri or default_tracking_uri()
        )
        csv_path = predict_images(
            model,
            paths,
            args.out,
            thresholds,
            args.threshold,
            args.format,
            args.batch_size,
            overlays=not args.no_overlays,
        )
    except (PredictInputError, DatasetError, ModelReferenceError) as err:
        return _fail(str(err))
    print(f"scores of {len(paths)} image(s): {csv_path}")
    return 0


def _fail(message: str) -> int:
    print(f"fbft predict: error: {message}", file=sys.stderr)
    return 2
