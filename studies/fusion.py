"""How the two contextualisation-specific maps are fused (Table 9)."""

from fbft.study import Axis, Study, main

STUDY = Study(
    name="fusion",
    title="Fusion of Δ_j and Δ_k",
    axes=(Axis("fusion", "--fusions", ("product", "sum", "j", "k"), "product, sum, Δ_j or Δ_k"),),
)

if __name__ == "__main__":
    raise SystemExit(main(STUDY))
