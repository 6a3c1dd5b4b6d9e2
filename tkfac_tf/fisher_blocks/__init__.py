"""Fisher blocks: per-layer factor state, damped inverses and preconditioning.

One block per registered layer. The block holds running averages of its
Kronecker factors and the inverses of their damped forms, and implements

    precond(∇Θ) = L̂⁻¹ ∇Θ R̂⁻¹  =  (L̂ ⊗ R̂)⁻¹ vec(∇Θ)      (row-major vec)

for ∇Θ [d_a, d_g]. ``full_fisher()`` returns the undamped approximation as a
dense [d_a·d_g, d_a·d_g] matrix in the same row-major order.

What is averaged (exponential moving average with decay ε, the first update
initialises): TKFAC averages the undamped halves of the seed's damped
factors, L = √δ Φ and R = √δ Ψ, each batch's own √δ times its own Φ, Ψ
(Gao et al. keep the EMA of Φ̂ = √δ Φ + √λ I and Ψ̂ = √δ Ψ + √λ I; adding
√λ I at inversion time gives the same numbers while λ is constant, and lets
a damping change take effect at the next inversion). K-FAC averages A and G.

Damping: by default ('plain') every block uses the optimizer's λ. With
``damping_mode='trace_scaled'`` (offered for conv blocks, our reading of the
conv damping of Gao et al. 2021) a block uses

    λ_l = max(δ_l / n_l, ν)

with δ_l the trace of its approximate Fisher (TKFAC: tr L · tr R, which is
δ for a single batch; K-FAC: tr(A ⊗ G) = tr(A)·tr(G)), n_l = d_a·d_g its parameter count and ν the floor,
i.e. the mean eigenvalue of the block, so the damping scales with the
block's own curvature instead of one global λ dominating small blocks.

Modules: ``base`` (the ``FisherBlock`` interface every block implements),
``kronecker`` (TKFAC / K-FAC, grouped, multi-part), ``embedding``,
``moments`` (scale-and-shift, diagonal, full); ``make_block`` builds the
block of a layer collection entry.
"""

from tkfac_tf.fisher_blocks.base import (
    CONV_STATISTICS,
    DAMPING_MODES,
    DAMPING_SPLITS,
    EIGENBASIS,
    INVERSE_METHODS,
    FisherBlock,
    damping_shifts,
    kron,
    subset_of_examples,
)
from tkfac_tf.fisher_blocks.embedding import EmbeddingKFACBlock, EmbeddingTKFACBlock
from tkfac_tf.fisher_blocks.kronecker import (
    BLOCK_CLASSES,
    GROUPED_BLOCK_CLASSES,
    GroupedKFACBlock,
    GroupedTKFACBlock,
    KFACBlock,
    KroneckerFisherBlock,
    MultiPartBlock,
    TKFACBlock,
    batched_identity,
    block_diagonal,
)
from tkfac_tf.fisher_blocks.moments import (
    DAMPING_RULES,
    DiagonalBlock,
    FullBlock,
    ScaleAndShiftBlock,
    kronecker_consistent_shift,
)


__all__ = [
    "CONV_STATISTICS",
    "DAMPING_MODES",
    "DAMPING_SPLITS",
    "EIGENBASIS",
    "INVERSE_METHODS",
    "FisherBlock",
    "damping_shifts",
    "kron",
    "subset_of_examples",
    "EmbeddingKFACBlock",
    "EmbeddingTKFACBlock",
    "BLOCK_CLASSES",
    "GROUPED_BLOCK_CLASSES",
    "GroupedKFACBlock",
    "GroupedTKFACBlock",
    "KFACBlock",
    "KroneckerFisherBlock",
    "MultiPartBlock",
    "TKFACBlock",
    "batched_identity",
    "block_diagonal",
    "DAMPING_RULES",
    "DiagonalBlock",
    "FullBlock",
    "ScaleAndShiftBlock",
    "kronecker_consistent_shift",
    "make_block",
    "block_class",
]


def make_block(approximation, entry, add_variable, damping_mode="plain", damping_floor=1e-6,
               inverse_method="cholesky"):
    """The block for one entry of ``LayerCollection.get_config()['layers']``:
    the block of its structure (embedding, scale-and-shift, diagonal), or a
    Kronecker block: plain, grouped (``groups`` > 1) or multi-part
    (``parts``), keeping the inverse state of ``inverse_method``."""
    name = entry["layer"]
    options = dict(damping_mode=damping_mode, damping_floor=damping_floor,
                   inverse_method=inverse_method)

    def single(spec, prefix):
        groups = int(spec.get("groups", 1))
        if groups > 1:
            return GROUPED_BLOCK_CLASSES[approximation](
                prefix, spec["input_size"], spec["output_size"], add_variable, groups, **options
            )
        return BLOCK_CLASSES[approximation](
            prefix, spec["input_size"], spec["output_size"], add_variable, **options
        )

    structure = entry.get("structure", "kronecker")
    if structure != "kronecker":
        return block_class(structure, approximation)(
            name, entry["input_size"], entry["output_size"], add_variable, **options
        )
    if entry.get("parts"):
        return MultiPartBlock(
            name, [single(part, f"{name}_part{i}") for i, part in enumerate(entry["parts"])]
        )
    return single(entry, name)


def block_class(structure, approximation):
    """The block class of a non-Kronecker ``structure`` of a layer kind
    ('embedding', 'scale_and_shift', 'diagonal', 'full') for 'tkfac' / 'kfac'."""
    if structure == "embedding":
        return {"tkfac": EmbeddingTKFACBlock, "kfac": EmbeddingKFACBlock}[approximation]
    if structure == "scale_and_shift":
        return ScaleAndShiftBlock
    if structure == "diagonal":
        return DiagonalBlock
    if structure == "full":
        return FullBlock
    raise ValueError(f"Unknown block structure {structure!r}.")
