"""A study's trials as typed values: the plan builds every :class:`Cell` once on the driver; the
trial (on a worker), the progress lines and the report read its fields, never a dict's keys.

A cell travels to Tune as the ``trial`` entry of a trial's config; a search adds the sampled
FBFTConfig fields beside it, which :meth:`Cell.of` folds into the cell's changes and axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fbft.detectors.registry import DEFAULT_METHOD
from fbft.study.spec import layer_pair, show

CELL_KEY = "trial"  # the Tune config entry holding the cell


@dataclass(frozen=True)
class Cell:
    """One trial's own settings.

    ``data``/``categories``: where it runs (one category for a grid trial, all for a search
    trial); ``method``, ``shots``, ``seed``: what it trains; ``changes``: the FBFTConfig fields
    its training axes set; ``axes``: every axis value as shown in run names and tables.
    """

    data: str
    categories: tuple[str, ...]
    method: str = DEFAULT_METHOD
    shots: int | str = "full"
    seed: int = 0
    changes: Mapping[str, Any] = field(default_factory=dict)
    axes: Mapping[str, str] = field(default_factory=dict)
    index: int | None = None  # position in the grid (None: a search trial)
    sampled: Mapping[str, Any] = field(default_factory=dict)  # a search's sampled values

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> Cell:
        """The cell of a Tune trial config, with a search's sampled fields folded in."""
        cell = config[CELL_KEY]
        if not isinstance(cell, Cell):
            raise TypeError(f"a trial config's {CELL_KEY!r} entry must be a Cell, got {cell!r}")
        sampled = {k: v for k, v in config.items() if k != CELL_KEY}
        if not sampled:
            return cell
        changes = {**cell.changes, **sampled}
        if isinstance(changes.get("layers"), str):
            changes["layers"] = layer_pair(changes["layers"])
        axes = {**cell.axes, **{k: show(v) for k, v in sampled.items()}}
        return replace(cell, changes=changes, axes=axes, sampled=sampled)

    @property
    def where(self) -> str:
        """The category, or how many a search trial runs."""
        if len(self.categories) == 1:
            return self.categories[0]
        return f"{len(self.categories)} cats"

    def label(self) -> str:
        """``gravel shots=5 seed=0``: the categories and the axes, for terminal lines."""
        shown = {**self.axes, **{k: _short(v) for k, v in self.sampled.items()}}
        return " ".join([",".join(self.categories), *(f"{k}={v}" for k, v in shown.items())])

    def config(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The detector config of this trial: the study's base config with the axes' changes,
        seeded with the trial's seed (the students' initialisation and batch order, the
        baselines' random projection; the few-shot draw uses the same seed)."""
        return {**base, **self.changes, "seed": self.seed}


def run_key(cell: Cell, trial_id: str) -> str:
    """The key of a trial's child runs: its grid position, so a grid run again from scratch
    (Tune's experiment folder lost) finds the runs it finished; a search trial's Tune id."""
    return f"cell-{cell.index}" if cell.index is not None else trial_id


def varying_axes(cells: Sequence[Cell]) -> tuple[str, ...]:
    """The axes that take more than one value over a study's cells (in their order)."""
    names = dict.fromkeys(k for c in cells for k in c.axes)
    return tuple(k for k in names if len({c.axes.get(k) for c in cells}) > 1)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else show(value)
