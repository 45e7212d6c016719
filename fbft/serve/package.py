"""The fbft code a logged model carries: the modules its models-from-code file imports, no more.

Why code travels at all: a model is served with ``--env-manager local`` (or loaded) where fbft
may be missing or another version; fbft is not on PyPI, so its requirements cannot name it, and
the saved detector's format is read by the code that wrote it. MLflow copies ``code_paths`` into
the model's ``code/`` folder and puts that folder first on ``sys.path`` when it loads the model;
so in a fresh process (``mlflow models serve``, a script that loads the model before importing
fbft) ``import fbft`` finds this copy, which holds only what scoring needs (no ``fbft.study``,
``fbft.cli``, figures or dataset generators): import those before loading the model.

The modules are found by :mod:`modulefinder` (the standard library's bytecode scan of every
import statement, those inside functions included) from ``model_code.py``, plus the modules of
the registered detector methods (imported by name when a saved file names its method).
"""

from __future__ import annotations

import modulefinder
import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
MODEL_CODE = Path(__file__).resolve().with_name("model_code.py")


def needed_modules() -> list[str]:
    """Names of the fbft modules the served model imports (sorted)."""
    from fbft.detectors.registry import detector_class, methods

    finder = modulefinder.ModuleFinder(path=[str(PACKAGE_DIR.parent)])
    finder.run_script(str(MODEL_CODE))
    for method in methods():
        finder.import_hook(detector_class(method).__module__)
    return sorted(name for name in finder.modules if name.split(".")[0] == PACKAGE_DIR.name)


def needed_files() -> list[Path]:
    """The files of :func:`needed_modules`, relative to the package's parent folder."""
    files = []
    for name in needed_modules():
        parts = name.split(".")
        module = PACKAGE_DIR.parent.joinpath(*parts)
        files.append(module / "__init__.py" if module.is_dir() else module.with_suffix(".py"))
    return [f.relative_to(PACKAGE_DIR.parent) for f in files]


def stage(folder: Path) -> Path:
    """A copy of :func:`needed_files` under ``folder``; returns ``folder/fbft`` (a code path)."""
    for relative in needed_files():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_DIR.parent / relative, target)
    return folder / PACKAGE_DIR.name
