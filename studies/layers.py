"""Which pair of teacher blocks to transfer between: fused maps and each direction (Table 7)."""

from fbft.study import Axis, Study, layer_pair, main

STUDY = Study(
    name="layers",
    title="Layer pairs: fused (product), forward j→k (Δ_k) and backward j←k (Δ_j)",
    axes=(
        Axis(
            "layers",
            "--pairs",
            ((1, 4), (4, 8), (8, 12), (10, 12), (11, 12)),
            "block pairs j,k",
            layer_pair,
        ),
        Axis(
            "fusion", "--maps", ("product", "k", "j"), "product = fused; k = forward; j = backward"
        ),
    ),
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
