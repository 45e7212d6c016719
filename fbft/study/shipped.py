"""Nothing driver-local reaches a worker: what the driver resolved (the teacher weights file,
the synthetic benchmark it generated) travels with a SHA-256 that every trial verifies.

The weights go through Ray's object store and land once per node in that node's cache folder;
the synthetic benchmark is used in place when the node sees the same files (shared storage),
else regenerated on the node from its seed and checked against the driver's checksum. The
feature cache may be node-local: without ``--cache-dir`` each node uses its own default.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ShippedFileError(Exception):
    """A shipped file does not match the driver's checksum (a deterministic failure)."""


@dataclass(frozen=True)
class Shipped:
    """What every trial receives from the driver besides its settings."""

    weights: Any = None  # Ray ObjectRef of the weights file's bytes; None: nothing to ship
    weights_name: str = ""
    weights_sha256: str = ""
    cache_root: str | None = None  # None: each node's default cache folder
    synthetic_root: str = ""  # the driver's synthetic benchmark ("" with --data)
    synthetic: dict[str, str] = field(default_factory=dict)  # category -> checksum
    synthetic_params: dict[str, Any] = field(default_factory=dict)


def tree_sha256(folder: Path) -> str:
    """SHA-256 over the relative paths and bytes of every file under ``folder``."""
    digest = hashlib.sha256()
    folder = folder.resolve()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def ship(plan: Any, cache_root: Path, cache_given: bool) -> Shipped:
    """On the driver, after ``ray.init``: the weights into the object store, checksums."""
    import ray

    from fbft.study.plan import SYNTHETIC

    weights = plan.base.weights
    ref, name, sha = None, "", ""
    if weights not in ("random", "auto", "hub") and Path(weights).is_file():
        data = Path(weights).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        ref, name = ray.put(data), Path(weights).name
        del data
    synthetic: dict[str, str] = {}
    root = ""
    if plan.data.synthetic:
        root = plan.data.roots[0]
        cats = next(iter(plan.data.categories.values()))
        synthetic = {c: tree_sha256(Path(root) / c) for c in cats}
    return Shipped(
        ref,
        name,
        sha,
        str(cache_root) if cache_given else None,
        root,
        synthetic,
        dict(SYNTHETIC) if plan.data.synthetic else {},
    )


def node_cache_root(shipped: Shipped) -> Path:
    """This node's cache folder: the one given on the command line, else the node's default."""
    from fbft.cache.features import default_cache_dir

    return Path(shipped.cache_root) if shipped.cache_root else default_cache_dir()


def weights_on_node(shipped: Shipped) -> str | None:
    """The shipped weights as a file on this node (written once, checksum verified), or None
    when nothing was shipped (random init)."""
    if shipped.weights is None:
        return None
    import ray

    from fbft.core.weights import file_sha256

    folder = node_cache_root(shipped) / "weights" / shipped.weights_sha256
    target = folder / shipped.weights_name
    if target.is_file() and file_sha256(target) == shipped.weights_sha256:
        return str(target)
    data = ray.get(shipped.weights)
    if hashlib.sha256(data).hexdigest() != shipped.weights_sha256:
        raise ShippedFileError(
            f"teacher weights {shipped.weights_name}: the bytes received differ from the "
            f"driver's (SHA-256 {shipped.weights_sha256[:12]}…)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{shipped.weights_name}.{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data)
    os.replace(tmp, target)  # atomic: trials on this node never read half a file
    return str(target)


def data_on_node(shipped: Shipped, data: str, category: str) -> str:
    """The dataset root a trial reads: ``data`` itself, or, for the synthetic benchmark when
    this node does not hold the driver's files, a copy regenerated here from its seed."""
    expected = shipped.synthetic.get(category)
    if not shipped.synthetic_root or data != shipped.synthetic_root or expected is None:
        return data
    if (Path(data) / category).is_dir() and tree_sha256(Path(data) / category) == expected:
        return data
    from fbft.study.plan import ensure_synthetic

    driver_root = Path(shipped.synthetic_root)
    local = node_cache_root(shipped) / "synthetic" / driver_root.name
    ensure_synthetic(local, [category], shipped.synthetic_params, progress=False)
    found = tree_sha256(local / category)
    if found != expected:
        raise ShippedFileError(
            f"synthetic benchmark {category!r} regenerated on this node differs from the "
            f"driver's (SHA-256 {found[:12]}… vs {expected[:12]}…): the two nodes run different "
            "fbft/numpy/Pillow versions; use one image, or pass --data on shared storage"
        )
    return str(local)
