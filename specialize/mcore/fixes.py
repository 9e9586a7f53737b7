"""Fixes for megatron-core 0.16.1 DistributedOptimizer checkpointing with torch's Adam.

Without Transformer Engine or Apex (every CPU run, and GPU runs without them), megatron-core uses
``torch.optim.AdamW``, whose per-parameter ``step`` the DistributedOptimizer mishandles on load:

1. ``load_state_dict`` puts ONE shared ``step`` tensor into every parameter's state. Adam increments
   it in place once per parameter per step, so after a resume the bias correction runs N times
   too fast — silently wrong training. Fix: give each parameter its own copy after loading.
2. Loading into a never-stepped optimizer (every resume) asserts in ``state_dict`` because no state
   has a ``step`` yet. Fix: create zero state with ``step`` first, as megatron's ``init_state_fn``
   does for the moments.
3. ``_set_main_param_and_optimizer_states`` copies every key of the live state from the loaded
   tensors, ``step`` included, but the loaded tensors never carry ``step`` (it travels in the param
   groups): KeyError. Fix: leave ``step`` out of that copy.

``install()`` applies them only on that path; with TE/Apex optimizers megatron-core is untouched.

``install_logits_max()``: megatron-core's unfused vocab-parallel cross entropy takes each token's
maximum logit with ``torch.max(logits, dim=-1)[0]``, which also computes the argmax indices it
throws away; ``torch.amax`` gives the same values (a maximum is exact) in less than half the time
over 151,936-wide rows (BENCHMARKS.md: 33 ms against 76 ms per 1,024 tokens on this CPU). It
matters where that path still runs: training with ``train.chunked_cross_entropy=false``.
"""

from __future__ import annotations

import functools

import torch

_installed = False


def _init_state_with_step(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if "step" not in state:
                state.setdefault("exp_avg", torch.zeros_like(p.data))
                state.setdefault("exp_avg_sq", torch.zeros_like(p.data))
                state["step"] = torch.tensor(0.0)


def _untie_steps(optimizer: torch.optim.Optimizer) -> None:
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].detach().clone()


def install() -> bool:
    global _installed
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    if _installed:
        return True
    cls = distrib_optimizer.DistributedOptimizer

    original_sharded_state_dict = cls.sharded_state_dict

    @functools.wraps(original_sharded_state_dict)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, *args, **kwargs):
        if is_loading:
            _init_state_with_step(self.optimizer)
        return original_sharded_state_dict(
            self, model_sharded_state_dict, is_loading, *args, **kwargs
        )

    original_load_state_dict = cls.load_state_dict

    @functools.wraps(original_load_state_dict)
    def load_state_dict(self, state_dict):
        result = original_load_state_dict(self, state_dict)
        _untie_steps(self.optimizer)
        return result

    original_set_states = cls._set_main_param_and_optimizer_states

    @functools.wraps(original_set_states)
    def set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original_set_states(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[
            self.optimizer.param_groups[group_index]["params"][group_order]
        ]
        step = state.pop("step", None)
        try:
            return original_set_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    cls.sharded_state_dict = sharded_state_dict
    cls.load_state_dict = load_state_dict
    cls._set_main_param_and_optimizer_states = set_main_param_and_optimizer_states
    _installed = True
    return True


_logits_max_installed = False


def install_logits_max() -> None:
    """``VocabParallelCrossEntropy.calculate_logits_max`` with ``torch.amax`` (see above)."""
    global _logits_max_installed
    if _logits_max_installed:
        return
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

    def calculate_logits_max(vocab_parallel_logits: torch.Tensor):
        vocab_parallel_logits = vocab_parallel_logits.float()
        return vocab_parallel_logits, torch.amax(vocab_parallel_logits, dim=-1)

    VocabParallelCrossEntropy.calculate_logits_max = staticmethod(calculate_logits_max)
    _logits_max_installed = True
