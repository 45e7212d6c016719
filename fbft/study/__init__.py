"""Studies: declarative Ray Tune experiments over FBFT and its baselines, tracked in MLflow.

A study script declares what it varies (``spec``: :class:`Axis`, :class:`Search`,
:class:`Study`) and calls :func:`main`. The command line becomes a typed ``options.Options``;
the ``runner`` (driver) checks every input (``checks``), decides what to run (``plan``: data,
preset, teacher weights resolved once, trials and variants), starts or resumes the Tune
experiment (``state``) and prints progress (``progress``); each
trial runs on a Ray worker (``trial``: MLflow child runs and Tune reports around ``job``: data ->
tokens -> one fit -> every variant -> metrics); ``report`` prints the table and finishes the
parent run.
"""

from __future__ import annotations

from collections.abc import Sequence

from fbft.study.spec import (
    Axis,
    Search,
    Study,
    backbone_at_size,
    backbone_changes,
    layer_pair,
    method,
    shots,
)

__all__ = [
    "Axis",
    "Search",
    "Study",
    "backbone_at_size",
    "backbone_changes",
    "layer_pair",
    "main",
    "method",
    "shots",
]


def main(study: Study, argv: Sequence[str] | None = None) -> int:
    """Run a study from the command line; returns the process exit code."""
    import sys

    from fbft.study.options import parse

    options = parse(study, sys.argv[1:] if argv is None else argv)  # before Ray and torch load
    from fbft.study.runner import run_main

    return run_main(study, options)
