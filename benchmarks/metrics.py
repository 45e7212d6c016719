"""Speed and memory of fbft.metrics.evaluate at full resolution, next to one np.sort.

Cases: 40 maps of 1500×1500 and a VisA-sized category (200 maps of 1500×1500), about half of
them with ground-truth components of log-uniform sizes (1 px to ~1% of the image), maps made
like FBFT's (a 74×74 patch grid upsampled, blurred), defects partly found. Reported: seconds for
all keys in exact and official (99-threshold) mode on the same accumulated data, peak extra
memory (resident memory above the level before, sampled every 10 ms; and tracemalloc's peak of
numpy allocations, which counts a buffer at full size as soon as it is allocated even though the
kernel commits its pages only as they are written), and the time of one np.sort of all scores.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import tracemalloc

import numpy as np
import torch
from common import machine, parser, save, table

from fbft.core.maps import anomaly_map
from fbft.metrics import MetricAccumulator


def make_case(n_maps: int, side: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """FBFT-like maps and masks: half the images hold 1-6 defects of log-uniform area."""
    rng = np.random.default_rng(seed)
    grid = max(2, round(side / 14 / 1.4))  # a 1036-px teacher's grid, scaled to the side
    maps, masks = [], []
    yy, xx = np.mgrid[0:side, 0:side]
    for i in range(n_maps):
        patch = torch.from_numpy(rng.gamma(2.0, 0.05, size=(grid, grid)).astype(np.float32))
        mask = np.zeros((side, side), bool)
        if i % 2:
            for _ in range(rng.integers(1, 7)):
                area = float(np.exp(rng.uniform(0, np.log(0.01 * side * side))))
                r = max(0.5, np.sqrt(area / np.pi))
                cy, cx = rng.uniform(r, side - r, size=2)
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                if not blob.any():
                    blob[int(cy), int(cx)] = True
                mask |= blob
                if rng.random() < 0.7:  # found: raise the patches under the defect
                    gy, gx = int(cy / side * grid), int(cx / side * grid)
                    patch[gy, gx] += float(rng.uniform(0.2, 1.0))
        maps.append(anomaly_map(patch, side, side).numpy())
        masks.append(mask)
    return maps, masks


def rss() -> int:
    """Resident memory of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident memory above the starting level while the block runs (10 ms samples)."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(self.peak, rss()) - self.base


def measure(maps: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    flat = np.concatenate([m.ravel() for m in maps])
    start = time.perf_counter()
    np.sort(flat)
    sort_s = time.perf_counter() - start
    del flat
    gc.collect()

    def run() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        acc = MetricAccumulator(device="cpu", pixels=sum(m.size for m in maps))
        for m, g in zip(maps, masks, strict=True):
            acc.update(m, g)
        t1 = time.perf_counter()
        acc.compute(None)
        t2 = time.perf_counter()
        acc.compute(99)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    gc.collect()
    with PeakRSS() as memory:
        update_s, exact_s, official_s = run()
    gc.collect()
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = update_s + exact_s + official_s
    return {
        "pixels_M": sum(m.size for m in maps) / 1e6,
        "np_sort_s": sort_s,
        "update_s": update_s,
        "exact_s": exact_s,
        "official_s": official_s,
        "both_modes_s": total,
        "ratio_to_sort": total / sort_s,
        "peak_extra_rss_MB": memory.extra / 2**20,
        "peak_allocated_MB": peak / 2**20,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    cases = (
        [("quick: 8 maps 500²", 8, 500)]
        if args.quick
        else [
            ("40 maps 1500²", 40, 1500),
            ("VisA-sized: 200 maps 1500²", 200, 1500),
        ]
    )
    rows = []
    for name, n, side in cases:
        maps, masks = make_case(n, side)
        row = {"case": name, **measure(maps, masks)}
        rows.append(row)
        print(table([row], list(row)), flush=True)
        del maps, masks
        gc.collect()
    columns = ["case", "pixels_M", "np_sort_s", "update_s", "exact_s", "official_s",
               "both_modes_s", "ratio_to_sort", "peak_extra_rss_MB",
               "peak_allocated_MB"]  # fmt: skip
    print(f"\n{machine()['cpu']}, {machine()['cores']} cores\n")
    print(table(rows, columns))
    save("metrics", args, rows)


if __name__ == "__main__":
    main()
