"""``einfx demo``: the structure table for a built-in set of layer sizes."""

from __future__ import annotations

from einfx.structures import Structure, taxonomy

DEMO_SIZES = ((768, 768), (768, 3072), (3072, 768), (1024, 1024), (4096, 4096))
DEMO_STRUCTURES = (
    Structure.dense(), Structure.low_rank(rank_frac=0.25), Structure.kronecker(), Structure.tensor_train(rank=2),
    Structure.monarch(), Structure.btt(rank=4),
)


def structure_table(sizes=DEMO_SIZES, structures=DEMO_STRUCTURES) -> str:
    """A text table: sizes, params, FLOPs per token and taxonomy of each structure at each layer size."""
    head = f"{'layer':>11} {'structure':<24} {'sizes':<30} {'params':>10} {'MACs/token':>11} {'x fewer':>8}  ω    ψ    ν"
    lines = [head, "-" * len(head)]
    for d_in, d_out in sizes:
        for s in structures:
            z = s.resolve(d_in, d_out)
            t = taxonomy(s, d_in, d_out)
            macs = z.macs_per_token(z.best_token_order()) if not z.dense else d_in * d_out
            lines.append(
                f"{f'{d_in}->{d_out}':>11} {s.name:<24} {z.describe():<30} {z.params:>10,} {macs:>11,} "
                f"{d_in * d_out / macs:>8.1f}  {t.omega:.2f} {t.psi:.2f} {t.nu:.2f}"
            )
    return "\n".join(lines)


def run_demo(quick: bool = False) -> int:
    print(structure_table(DEMO_SIZES[:2] if quick else DEMO_SIZES))
    return 0
