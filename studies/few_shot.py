"""Few-shot FBFT: 5, 10 and 50 nominal training images per category (the paper's Table 3)."""

from fbft.study import Axis, Study, main, shots

STUDY = Study(
    name="few-shot",
    title="Few-shot FBFT (means over categories)",
    axes=(
        Axis(
            "shots",
            "--shots",
            (5, 10, 50),
            "nominal training images per category, or full (all of them)",
            shots,
        ),
    ),
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
