"""MLflow models-from-code: the pyfunc model of a saved fbft detector, any registered method.

MLflow runs this file by path (``python_model=<this file>`` in :func:`fbft.serve.pyfunc.log_model`)
when it logs and when it loads the model, so the model is code, not a pickle. The request and
the answer are :mod:`fbft.serve.frame`'s: an ``image`` (file bytes) or ``path`` column in;
score, decision and, with the param ``maps: true``, the map and the mask's components out.
``FBFT_DEVICE`` chooses where it runs (default: CUDA when present); ``FBFT_SERVE_PATHS`` names
the folders ``path`` inputs may read (read at load time; unset: path input is refused).
"""

from __future__ import annotations

import json
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from fbft.data.errors import DatasetError
from fbft.serve.frame import ServingInputError, score_frame, served_folders
from fbft.serve.pyfunc import load_artifacts


class RequestError(MlflowException):
    """A bad request, answered as HTTP 400 with one line: ``{"error_code", "message"}``.

    MLflow's scoring server rewrites an MlflowException's message to ``Failed to predict data
    '<the whole input DataFrame>'. Error: ...`` (many lines, echoing the client's images) before
    it serialises it; the body keeps this one line instead."""

    def __init__(self, line: str) -> None:
        self.line = " ".join(line.split())
        super().__init__(self.line, error_code=INVALID_PARAMETER_VALUE)

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.line})


class DetectorModel(PythonModel):
    """DataFrame of images (``image`` or ``path``) -> DataFrame of scores (and maps)."""

    def load_context(self, context: Any) -> None:
        self.detector, self.thresholds = load_artifacts(
            context.artifacts, os.environ.get("FBFT_DEVICE", "auto")
        )
        self.folders = served_folders()

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            return score_frame(self.detector, model_input, self.thresholds, params, self.folders)
        except (ServingInputError, DatasetError) as err:
            raise RequestError(str(err)) from None


mlflow.models.set_model(DetectorModel())
