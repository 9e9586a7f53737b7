"""The CPU bridge: lets megatron-core 0.16.1 run on machines without CUDA.

megatron-core assumes a GPU in a few places that a CPU run passes through (measured on 0.16.1):
tensors created with ``device="cuda"`` / ``torch.cuda.current_device()`` (pipeline schedules and
p2p communication, the default causal mask, rotary embedding, grad-norm buffers, optimizer scalars,
the checkpoint saver), ``torch.cuda.synchronize()``, the model-parallel RNG tracker (CUDA generator
states) and three ``tensor.type() == "torch.cuda.FloatTensor"`` assertions in the optimizer and grad
clipping. No library switch covers these, so this module bridges them and nothing else:

* a torch-function mode maps CUDA device arguments and ``Tensor.cuda()`` to the CPU;
* ``torch.cuda.current_device`` answers the CPU device and ``torch.cuda.synchronize`` does nothing;
* an RNG tracker with CPU generator states replaces the CUDA one (same names, same seeding);
* the three type assertions see the CUDA type names while they run.

``install()`` does nothing when CUDA is available: GPU runs use megatron-core untouched. The
trainer, model and data code are the same on both.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_spoof = threading.local()


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare ordinal means a CUDA device
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placements to the CPU; optionally reports CUDA tensor type names."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
            kwargs.pop("pin_memory", None)
        elif func is torch.Tensor.to and args[1:2] and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if (
            func is torch.Tensor.type
            and len(args) == 1
            and not kwargs
            and getattr(_spoof, "on", False)
        ):
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return func(*args, **kwargs)


@contextlib.contextmanager
def _cuda_type_names() -> Iterator[None]:
    previous = getattr(_spoof, "on", False)
    _spoof.on = True
    try:
        yield
    finally:
        _spoof.on = previous


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron's tracker with CPU generator states in place of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    return CpuRNGStatesTracker


def install() -> bool:
    """Bridge megatron-core's CUDA-only spots when there is no CUDA. Returns whether it did."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import random as mp_random

    # A CUDA tuning hint megatron-core prints for TP layers; it means nothing without CUDA.
    warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    _CudaToCpuMode().__enter__()  # stays active for the life of the process

    mp_random._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip
    for cls in (
        distrib_optimizer.DistributedOptimizer,
        optimizer.Float16OptimizerWithFloat16Params,
    ):
        cls.__init__ = _with_cuda_type_names(cls.__init__)
    _installed = True
    return True
