"""Where the teacher weights come from: a local file, the Hugging Face cache or hub, or a
random init. The study driver resolves them once (:func:`resolve_weights`) and passes the
resulting file to every trial, so all trials use the same weights and no trial downloads.
"""

from __future__ import annotations

import hashlib
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import timm

HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")


class TeacherWeightsError(RuntimeError):
    """The requested teacher weights could not be loaded."""


def file_sha256(path: str | Path) -> str:
    """Content hash of a file (weights identity for the feature cache)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within ``timeout`` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_files(backbone: str) -> tuple[str, tuple[str, ...]] | None:
    """(repository, candidate file names) of a backbone's pretrained weights on the hub."""
    cfg = timm.models.get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo = cfg.hf_hub_id if cfg.hf_hub_id != "timm/" else f"timm/{backbone}"
    return repo, (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILENAMES


def cached_hub_file(backbone: str) -> Path | None:
    """The backbone's pretrained weights if they are already in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = _hub_files(backbone)
    for name in found[1] if found else ():
        path = try_to_load_from_cache(found[0], name)
        if isinstance(path, str):
            return Path(path)
    return None


def _download(backbone: str) -> Path:
    from huggingface_hub import hf_hub_download

    found = _hub_files(backbone)
    if found is None:
        raise OSError(f"timm names no hub weights for {backbone}")
    errors = []
    for name in found[1]:
        try:
            return Path(hf_hub_download(found[0], name))
        except Exception as err:
            errors.append(f"{name}: {err}")
    raise OSError("; ".join(errors))


def resolve_weights(backbone: str, weights: str = "auto", seed: int = 0) -> str:
    """``weights`` as a concrete local file path, or ``"random"``: resolve once per study.

    ``"auto"``/``"hub"``: the Hugging Face cache, else a download; when neither works ``"hub"``
    raises :class:`TeacherWeightsError` and ``"auto"`` warns loudly and returns ``"random"``.
    A path must exist.
    """
    if weights == "random":
        return weights
    if weights not in ("auto", "hub"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher weights file {str(path)!r} does not exist; pass an existing checkpoint "
                "(Meta DINOv2 .pth, timm .pth/.bin or .safetensors), or weights='hub' | 'auto' | "
                "'random'"
            )
        return str(path.resolve())  # absolute: a trial runs in another working directory
    cached = cached_hub_file(backbone)
    if cached is not None:
        return str(cached)
    reason = "the Hugging Face hub is not reachable and the weights are not in the local cache"
    if hub_reachable():
        try:
            return str(_download(backbone))
        except OSError as err:
            reason = f"downloading the weights failed: {err}"
    if weights == "hub":
        raise TeacherWeightsError(
            f"could not load pretrained weights for {backbone}: {reason}. Download them on a "
            "connected machine (they land in the Hugging Face cache, HF_HOME) or pass "
            "weights=<checkpoint file>; weights='random' runs with a random-init teacher."
        )
    warnings.warn(
        f"\n{'!' * 78}\n!! TEACHER WEIGHTS: {reason}.\n!! Falling back to a RANDOM-INIT "
        f"{backbone} (seed {seed}); results are NOT those of a pretrained teacher.\n!! Runs are "
        f"tagged teacher_weights=random. Pass weights=<file> to use a local checkpoint.\n"
        f"{'!' * 78}",
        stacklevel=2,
    )
    return "random"
