"""One category of one trial (fbft.study.job), without Ray or MLflow: typed cells and jobs."""

from __future__ import annotations

import torch
from tiny import tiny_config

from fbft.data.synthetic import generate
from fbft.study.cells import CELL_KEY, Cell
from fbft.study.job import Job, JobSettings, in_protocol, run_job


def students_of(outcome) -> dict[str, torch.Tensor]:
    return outcome.detector.students.state_dict()


def test_a_trials_seed_seeds_the_students_and_the_draw(tmp_path):
    data = generate(tmp_path / "data", categories=["gravel"], image_size=64, n_train=4, n_test=3)
    base = tiny_config(epochs=2).to_dict()

    def fitted(seed: int, shots: int | str = "full"):
        cell = Cell(str(data), ("gravel",), shots=shots, seed=seed)
        job = Job(str(data), "gravel", "fbft", {**cell.config(base), "progress": False},
                  cell.shots, cell.seed, JobSettings(pictures=0))  # fmt: skip
        return run_job(job, tmp_path / f"out-{seed}-{shots}")

    first, again, other = fitted(0), fitted(0), fitted(1)
    assert all(torch.equal(v, students_of(again)[k]) for k, v in students_of(first).items())
    assert any(not torch.equal(v, students_of(other)[k]) for k, v in students_of(first).items())
    assert first.detector.config.seed == 0 and other.detector.config.seed == 1
    assert first.metrics[0]["aupro_5"] != other.metrics[0]["aupro_5"]


def test_a_search_trials_sampled_fields_fold_into_its_cell():
    cell = Cell("/data", ("a", "b"), seed=3, changes={"epochs": 5}, axes={"seed": "3"})
    sampled = Cell.of({CELL_KEY: cell, "lr": 0.000123456, "layers": "8,12"})
    assert sampled.changes == {"epochs": 5, "lr": 0.000123456, "layers": (8, 12)}
    assert sampled.axes == {"seed": "3", "lr": "0.000123456", "layers": "8,12"}
    assert sampled.label() == "a,b seed=3 lr=0.000123 layers=8,12"
    assert sampled.where == "2 cats" and Cell.of({CELL_KEY: cell}) is cell
    assert sampled.config({"lr": 1.0, "seed": 0})["seed"] == 3


def test_figures_and_tables_read_the_same_protocol():
    metrics = {"aupro_5": 0.5, "official_aupro_5": 0.4, "i_auroc": 0.9}
    assert in_protocol(metrics, "official")["aupro_5"] == 0.4
    assert in_protocol(metrics, "exact")["aupro_5"] == 0.5
    assert in_protocol(metrics, "official")["i_auroc"] == 0.9


def test_only_axes_that_vary_lead_run_names():
    from fbft.study.cells import varying_axes

    cells = [Cell("/d", (c,), shots=n, axes={"shots": str(n), "seed": "0"})
             for n in (5, 10) for c in ("a", "b")]  # fmt: skip
    assert varying_axes(cells) == ("shots",)
    assert varying_axes(cells[:1]) == ()


def test_a_trial_on_a_shared_gpu_keeps_its_tokens_within_its_share():
    from fbft.study.node import device_config

    base = {"device": "auto", "max_token_gb": None}
    assert device_config(base, []) == base  # no GPU granted: auto stays auto
    assert device_config(base, ["0"], 1.0, 80e9) == {"device": "cuda", "max_token_gb": None}
    quarter = device_config(base, ["0"], 0.25, 80e9)
    assert quarter == {"device": "cuda", "max_token_gb": 10.0}  # half of a quarter of 80 GB
    given = {"device": "cuda:1", "max_token_gb": 3.0}
    assert device_config(given, ["1"], 0.25, 80e9) == given  # the user's budget is kept
