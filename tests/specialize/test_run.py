"""``specialize train`` set-up: what every rank must agree on before a model is built."""

from __future__ import annotations

from tests.distributed import run_distributed


def _layer_specs(rank: int, world_size: int) -> dict[str, str]:
    import base.spec
    from specialize.config import ConfigError, load_config
    from specialize.distributed import init_distributed
    from specialize.run import check_layer_spec

    # Rank 1's node has a Transformer Engine built for another torch; rank 0's works.
    why = None if rank == 0 else "import failed: undefined symbol"
    base.spec.why_not_te = lambda: why
    out = {}
    topo = None
    for spec in ("auto", "local"):
        cfg = load_config(None, ["train.steps=1", f"model.spec={spec}"])
        topo = topo or init_distributed(cfg.parallel)
        try:
            check_layer_spec(cfg, topo)
            out[spec] = "agreed"
        except ConfigError as e:
            out[spec] = str(e)
    return out


def test_ranks_that_resolve_auto_differently_are_refused() -> None:
    out = run_distributed(_layer_specs, world_size=2)
    assert out["auto"] == (
        "model.spec=auto resolves to te on rank 0 but to local on rank 1 (rank 1: import failed: "
        "undefined symbol); install the same Transformer Engine on every node, or set "
        "model.spec=local"
    )
    assert out["local"] == "agreed"
