"""The forward step: the output layer at learned positions only, and the chunked output layer +
loss, give the loss and gradients of megatron-core's unfused path at every position, at TP=2 and
PP=2 on packed SFT data, while computing fewer logits."""

from __future__ import annotations

import pytest
import torch

from base.tokenizer import EOD_ID
from tests.distributed import run_distributed
from tests.specialize.data.test_sft import SEQ, _prepare


def test_supervised_rows_are_sequence_first_and_never_empty() -> None:
    from specialize.train.step import _gathered, supervised_rows

    loss_mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]])  # [b, s]
    rows = supervised_rows(loss_mask)
    # Hidden states are [s, b, h]: row s * b + b_index.
    assert rows.tolist() == [1, 2, 4, 7]
    labels = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    assert _gathered(labels, rows).tolist() == [[20, 11, 12, 23]]
    empty = supervised_rows(torch.zeros(2, 3))
    assert empty.tolist() == [0] and _gathered(torch.zeros(2, 3), empty).tolist() == [[0.0]]


def _step(rank: int, world_size: int, run_dir: str, data: str) -> dict:
    from specialize.config import derive, load_config
    from specialize.data.pretrain import build_dataloader
    from specialize.data.sft import SFTSequences
    from specialize.mcore.distributed import init_distributed, seed_all
    from specialize.train.engine import Engine

    out, grads = {}, {}
    variants = {  # name: (supervised_logits_only, chunked_cross_entropy, chunk tokens)
        "only": (True, True, 64),  # the CPU default
        "only-unfused": (True, False, 256),
        "every-unfused": (False, False, 256),  # megatron-core's own path at every position
        "every-chunk7": (False, True, 7),
    }
    for layout, overrides in (("tp2", ["parallel.tensor=2"]), ("pp2", ["parallel.pipeline=2"])):
        for name, (only, chunked, chunk) in variants.items():
            cfg = load_config(
                "configs/base/qwen-nano.yaml",
                [
                    "data.format=sft",
                    f"data.paths=[{data}]",
                    f"data.seq_length={SEQ}",
                    "train.steps=1",
                    "schedule.warmup_steps=0",
                    "train.global_batch_size=2",
                    "train.micro_batch_size=1",
                    f"train.supervised_logits_only={only}",
                    f"train.chunked_cross_entropy={chunked}",
                    f"train.cross_entropy_chunk_tokens={chunk}",
                    f"checkpoint.dir={run_dir}-{layout}-{name}",
                    *overrides,
                ],
            )
            topo = init_distributed(cfg.parallel)
            seed_all(cfg.train.seed)
            engine = Engine.build(cfg, topo, derive(cfg, topo.world_size))
            gpt = engine.model[-1].module
            rows = []
            if hasattr(gpt, "output_layer"):  # the last pipeline stage (rank 0 at TP=2 only)
                gpt.output_layer.register_forward_hook(
                    lambda module, args, output, rows=rows: rows.append(output[0].shape[:2].numel())
                )
            dataset = SFTSequences(data, SEQ, pad_id=EOD_ID, attention="mask")
            loader = build_dataloader(dataset, 1, 0, topo.data_rank, topo.data_parallel, 0)
            result = engine.train_step([loader], 1)
            weights = sum(p.detach().double().sum().item() for p in gpt.parameters())
            # This rank's gradients of the step (DDP's buffers keep them until the next step).
            grads[layout, name] = torch.cat(
                [p.main_grad.detach().double().flatten() for p in gpt.parameters()]
            )
            out[f"{layout}-{name}"] = {
                "loss": result.loss,
                "grad_norm": result.grad_norm,
                "rows": rows,
                "weights": weights,
            }
            engine.close()
    # Largest gradient difference relative to the largest gradient, over both ranks.
    for (layout, name), ours in grads.items():
        reference = grads[layout, f"{name.split('-')[0]}-unfused"]
        error = torch.tensor((ours - reference).abs().max() / reference.abs().max())
        torch.distributed.all_reduce(error, op=torch.distributed.ReduceOp.MAX)
        out[f"{layout}-{name}"]["grad_error"] = error.item()
    return out


@pytest.fixture(scope="module")
def steps(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("step")
    data = _prepare(tmp, "packed", True)
    return run_distributed(_step, str(tmp / "run"), data)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_logits_at_learned_positions_only_give_the_same_step(steps, layout) -> None:
    only, every = steps[f"{layout}-only-unfused"], steps[f"{layout}-every-unfused"]
    assert only["loss"] == pytest.approx(every["loss"], rel=1e-6)
    assert only["grad_norm"] == pytest.approx(every["grad_norm"], rel=1e-6)
    assert only["weights"] == pytest.approx(every["weights"], rel=1e-9)
    assert 5.0 < every["loss"] < 20.0  # a real loss of a random model


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("variant", ["only", "every-chunk7"])
def test_chunked_output_loss_gives_megatrons_step(steps, layout, variant) -> None:
    ours = steps[f"{layout}-{variant}"]
    unfused = steps[f"{layout}-{variant.split('-')[0]}-unfused"]
    assert ours["loss"] == pytest.approx(unfused["loss"], rel=1e-6)
    assert ours["grad_norm"] == pytest.approx(unfused["grad_norm"], rel=1e-6)
    assert ours["grad_error"] < 1e-6 and unfused["grad_error"] == 0.0  # every gradient
    # The sums are rounded differently, so gradients agree to ~1e-7, not bit for bit; Adam's first
    # step divides each gradient by its own magnitude, so a near-zero one can move its weight by
    # up to the learning rate: weights agree to 1e-6, not to the 1e-9 of identical gradients.
    assert ours["weights"] == pytest.approx(unfused["weights"], rel=1e-6)


def test_logits_at_learned_positions_only(steps) -> None:
    # At TP=2, rank 0 holds the output layer: both micro-batches at every position, against the
    # learned ones only (GSM8K answers, not questions or system turn).
    only, every = steps["tp2-only"], steps["tp2-every-unfused"]
    assert every["rows"] == steps["tp2-every-chunk7"]["rows"] == [SEQ, SEQ]
    assert len(only["rows"]) == 2 and all(0 < n < SEQ for n in only["rows"])
