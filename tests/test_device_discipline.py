"""The device-discipline check itself: what it reports, where, and what it lets through.

This file counts as project code for the check (``device_discipline(project=[__file__])``);
``DEVICE`` is a tensor made outside it, standing for the model's tensors."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

from tests.device_discipline import DeviceError, device_discipline

DEVICE = torch.device("cpu")
HERE = "test_device_discipline.py"


def _line(fn, text: str) -> int:
    """The line of ``fn`` holding ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.ones(3, 4)  # made outside the check: on the model's device


@pytest.fixture
def world(tmp_path):
    """A gloo world of one process, for the collectives."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_host_tensor_used_with_a_device_tensor_names_where_it_was_made(weight):
    def offsets():
        return torch.arange(4)  # made here, no device=

    def shift(weight):
        shifted = offsets()[1:] * 2  # derived host tensors stay host tensors
        return weight[:, 1:] + shifted

    with pytest.raises(DeviceError) as caught:
        with device_discipline(project=[__file__]):
            shift(weight)
    made, used = _line(offsets, "torch.arange"), _line(shift, "weight[:, 1:] + shifted")
    assert str(caught.value).startswith(
        f"{HERE}:{used}: Tensor.add mixes a tensor made on the host at "
        f"{HERE}:{made} torch.arange() without device= with tensors on the model's device"
    )


def test_tensors_made_with_device_or_moved_there_pass(weight):
    with device_discipline(project=[__file__]):
        placed = torch.arange(4, device=weight.device)
        moved = torch.arange(4).to(DEVICE)
        from_numpy = torch.from_numpy(torch.arange(4).numpy()).to(weight.device)
        total = weight + placed + moved + from_numpy
        total = total * torch.tensor(2.0)  # a 0-dim host tensor is a scalar operand on CUDA too
        picked = weight[torch.tensor([0, 2])]  # host indices into a device tensor
        weight.copy_(torch.zeros(3, 4))  # a copy across devices
        weight[0] = torch.ones(4)
    assert total.shape == (3, 4) and picked.shape == (2, 4)


def test_cpu_in_project_code_makes_a_host_tensor_and_moving_it_back_ends_that(weight):
    with device_discipline(project=[__file__]):
        back = weight.cpu().to(DEVICE)
        assert torch.equal(back + weight, 2 * weight)
    with pytest.raises(DeviceError, match=r"\.cpu\(\)"):
        with device_discipline(project=[__file__]):
            weight.cpu() + weight


def test_the_device_of_a_host_tensor_is_the_host(weight):
    def positions(tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.shape[1], device=tokens.device)

    with pytest.raises(DeviceError) as caught:
        with device_discipline(project=[__file__]):
            tokens = torch.ones(2, 4, dtype=torch.long)
            weight + positions(tokens)
    where = f"{HERE}:{_line(positions, 'torch.arange')}"
    made = f"{HERE}:{_line(test_the_device_of_a_host_tensor_is_the_host, 'torch.ones(2, 4')}"
    assert f"{where} torch.arange(device=device(type='cpu'))" in str(caught.value)
    assert f"the device of a tensor made on the host at {made}" in str(caught.value)
    with pytest.raises(DeviceError, match=r"\.to\(device\(type='cpu'\)\)"):
        with device_discipline(project=[__file__]):
            weight.to(torch.ones(1).device) + weight


def test_a_0_dim_host_tensor_is_still_refused_by_stack(weight):
    with pytest.raises(DeviceError, match="torch.stack mixes"):
        with device_discipline(project=[__file__]):
            torch.stack([weight.sum(), torch.tensor(1.0)])


def test_from_numpy_is_a_host_tensor(weight):
    with pytest.raises(DeviceError, match=r"torch.from_numpy\(\)"):
        with device_discipline(project=[__file__]):
            weight + torch.from_numpy(weight.numpy().copy())


def test_other_code_may_mix_and_its_results_stay_host_tensors(weight):
    # Code outside the project (transformers, a test) is not checked; what it computes from a
    # host tensor is a host tensor.
    outside = {}
    exec(compile("def add(a, b):\n    return a + b\n", "<other library>", "exec"), outside)
    with pytest.raises(DeviceError, match=f"{HERE}:.*torch.ones"):
        with device_discipline(project=[__file__]):
            host = outside["add"](torch.ones(4), weight[0])
            weight[0] * host


def test_sampling_with_a_host_generator_fails_and_a_placed_one_draws_the_same(weight):
    probs = torch.softmax(torch.arange(8.0), 0)
    expected = torch.multinomial(probs, 4, generator=torch.Generator().manual_seed(3))
    with pytest.raises(DeviceError, match=r"torch.Generator\(\) without device="):
        with device_discipline(project=[__file__]):
            torch.multinomial(probs, 4, generator=torch.Generator().manual_seed(3))
    with device_discipline(project=[__file__]):
        generator = torch.Generator(device=DEVICE).manual_seed(3)
        assert isinstance(generator, torch.Generator)
        drawn = torch.multinomial(probs, 4, generator=generator)
    assert torch.equal(drawn, expected)


def test_collectives_refuse_host_tensors(world):
    with device_discipline(project=[__file__]):
        total = torch.ones(2, device=DEVICE)
        dist.all_reduce(total)
        dist.broadcast(total, src=0)
    for collective in (
        lambda t: dist.all_reduce(t),
        lambda t: dist.broadcast(t, src=0),
        lambda t: dist.all_gather_into_tensor(torch.empty(2, device=DEVICE), t),
        lambda t: dist.batch_isend_irecv([dist.P2POp(dist.isend, t, 0)]),
    ):
        with pytest.raises(DeviceError, match=f"is handed a tensor made on the host at {HERE}"):
            with device_discipline(project=[__file__]):
                collective(torch.zeros(2))


def test_a_swallowed_violation_fails_when_the_check_ends(weight):
    with pytest.raises(DeviceError, match="mixes"):
        with device_discipline(project=[__file__]):
            try:
                weight + torch.zeros(3, 4)
            except AssertionError:
                pass


def test_the_check_leaves_torch_as_it_found_it(weight):
    from torch.overrides import _get_current_function_mode_stack

    generator, from_numpy, gather = torch.Generator, torch.from_numpy, dist.all_gather_into_tensor
    modes = _get_current_function_mode_stack()
    with pytest.raises(DeviceError):
        with device_discipline(project=[__file__]):
            weight + torch.zeros(3, 4)
    assert (torch.Generator, torch.from_numpy) == (generator, from_numpy)
    assert dist.all_gather_into_tensor is gather
    assert _get_current_function_mode_stack() == modes
    weight + torch.zeros(3, 4)  # unchecked again
