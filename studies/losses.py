"""Training loss × anomaly-map distance (the paper's distance ablation)."""

from fbft.study import Axis, Study, main

STUDY = Study(
    name="losses",
    title="Training loss × map distance",
    axes=(
        Axis("loss", "--losses", ("cosine", "l2"), "students' training loss"),
        Axis("distance", "--distances", ("l2", "cosine"), "distance of the anomaly maps"),
    ),
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
