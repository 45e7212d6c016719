"""Using a trained detector: batch scoring of image files (``batch``, the `fbft predict` command
in ``command``), the MLflow pyfunc model (``pyfunc``) and the calibrated thresholds
(``thresholds``). With the study layer, the only layer that imports MLflow."""
