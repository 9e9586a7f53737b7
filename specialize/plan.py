"""``specialize plan``: per-GPU memory, a layout that fits, step time and GPU-hours of a recipe.

Everything below is arithmetic on the preset's real shape (``QwenPreset``: untied input embedding
and output layer, Q/K/V biases, SwiGLU, RMSNorm); nothing is allocated. Symbols: ``s`` sequence
length, ``b`` micro-batch size, ``h`` hidden size, ``a`` attention heads, ``kv`` key/value width
(query groups x head dim; ``= h`` for Qwen v1), ``f`` SwiGLU FFN width, ``L`` layers, ``V`` padded
vocabulary, ``t`` tensor-, ``p`` pipeline-, ``d`` data-parallel size, ``m`` micro-batches per step,
``e`` bytes per activation element (4 for fp32, 2 for bf16 and fp8).

Memory per rank, for the pipeline stage that needs the most (all terms in bytes):

- **Parameters on the rank** ``P_r``: each layer has ``(h(h+2kv) + (h+2kv) + h·h + 3hf)/t + 2h``
  (QKV weight and bias, output projection and SwiGLU weights split by TP; the two RMSNorm weights
  replicated); a stage holds ``L/p`` layers; the first stage adds the input embedding ``V·h/t``,
  the last the output layer ``V·h/t`` (untied) and the final norm ``h``. At ``t = p = 1`` this is
  ``QwenPreset.num_params()``.
- **weights** ``= P_r × 4`` (fp32) or ``× 2`` (bf16). FP8 keeps the bf16 weights and adds FP8
  copies of the transformer GEMM weights that Transformer Engine caches for the step, one for the
  forward and one transposed for the backward: ``+ 2`` bytes per GEMM weight (embedding and output
  layer stay bf16).
- **gradients** ``= P_r × 4``: ``specialize/train/engine.py`` builds megatron-core's DDP with
  ``grad_reduce_in_fp32=True``, so every parameter has an fp32 ``main_grad`` in DDP's contiguous
  buffer whatever the training dtype. The distributed optimizer does not shard this buffer (it
  reduce-scatters into it; ZeRO-1, not ZeRO-2).
- **optimizer** (AdamW): bf16/fp8 hold an fp32 master copy plus the two moments, ``P_r × 12``;
  fp32 trains the parameters themselves, ``P_r × 8``. With the distributed optimizer each rank keeps
  ``1/d`` of it.
- **activations**, per layer and micro-batch, Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", eq. 1-5: ``s·b·h·(34 + 5·a·s/h)`` in bf16 for a GeLU
  MLP of width 4h with dropout) adapted to this architecture: ``s·b·[e·(6h + 2kv + 3f) +
  2h·D_h] + a·s²·b·(e + (1 + e)·D_a)``. The ``6h + 2kv`` are the two norm inputs, the QKV GEMM
  input, Q/K/V, and the output-projection input; SwiGLU stores its GEMM input ``h``, its
  ``[gate; up]`` output ``2f`` and the fc2 input ``f`` (so ``3f`` where a GeLU MLP has ``2f``: with
  ``f = 4h``, ``e = 2`` and dropout this is exactly Korthikanti's 34). ``D_h``/``D_a`` are 1 when
  hidden/attention dropout is on (1-byte masks). The ``a·s²·b`` term (softmax and its dropout) is
  absent with Flash Attention (the ``te`` spec) and with selective recompute. Tensor parallelism
  without sequence parallelism splits everything but the ``4h`` GEMM/norm inputs and the dropout
  masks (Korthikanti's ``10 + 24/t``); with sequence parallelism everything is divided by ``t``.
  Full recompute (``recompute_num_layers=1``) keeps only each layer's input ``e·s·b·h`` (``/t``
  with SP) plus, during the backward, one layer's full activations being recomputed.
- **pipeline**: 1F1B keeps ``min(p - i, m)`` micro-batches in flight on stage ``i``; the first
  stage holds ``min(p, m)`` of them (for ``L/p`` layers each, i.e. up to ``L`` layers' worth), the
  last one.
- **logits** (last stage): megatron-core's vocab-parallel cross entropy turns an fp32 copy of the
  logits into the softmax it saves for the backward, in place: ``s·b·V/t × 4`` in fp32,
  ``× (2 + 4)`` in bf16 (the bf16 logits and their fp32 copy coexist during the forward), plus the
  final norm and output-layer inputs ``2·e·s·b·h``. With the chunked output layer + loss
  (``train.chunked_cross_entropy``, ``c`` tokens per chunk) only one chunk's logits exist:
  ``c·V/t × 4`` (``× (2 + 4)`` in bf16), plus the hidden-state gradient it computes in the forward
  ``e·s·b·h`` and, for bf16/fp8 weights, the fp32 accumulator of the output weight's gradient
  ``V·h/t × 4`` (its copy in the weights' dtype is the temporary below).
- **temporaries**: ``base/model.py`` turns gradient-accumulation fusion off, so each weight
  gradient is materialized in the parameter dtype before DDP's hook adds it to ``main_grad``; the
  largest, alive at the activation peak (start of the backward), is the output layer's (or the
  embedding's dense) ``V·h/t`` on the first/last stage.
- **runtime**: a fixed ``3 GiB`` on a GPU (0 in the CPU check): the CUDA context with cuBLAS and
  TE workspaces (~0.5 GiB) and NCCL's buffers for the communicators megatron-core uses (TP, DP, PP,
  model-parallel), ~0.6 GiB each (NVIDIA/nccl#964 measures 544-688 MB per communicator on A100;
  NVLink SHARP on H100 takes more, NVIDIA/nccl#864, which NeMo's launcher turns off with
  ``NCCL_NVLS_ENABLE=0``).
- **margin**: a layout *fits* when the total is at most ``headroom`` (default 90%) of the GPU's
  memory. The total is what the run allocates at its peak; the other 10% (8 GiB on an 80 GiB GPU)
  stay free for what the caching allocator holds on top of that (freed blocks it keeps, blocks too
  fragmented to reuse) and for what the estimate leaves out (below). ``--headroom`` sets it.

Not modeled: the interleaved (virtual) pipeline schedule, FP8 activation savings (FP8 activations
are counted as bf16, an upper bound), GQA-specific kernels, temporary buffers of the optimizer step.

Communication, per step and rank, from the bytes each collective moves and the bus bandwidth ``B``
of the slowest link in its group (nccl-tests' definition, NVIDIA/nccl-tests doc/PERFORMANCE.md @
03a204a1f38aaea17f1a777885bb2d9600ba7eff: a ring all-reduce of ``S`` bytes over ``n`` ranks takes
``S·2(n-1)/n / B``, a reduce-scatter or all-gather of ``S`` bytes in all ``S·(n-1)/n / B``).
megatron-core orders ranks TP first, then DP, then PP, so a TP group spans ``t`` consecutive ranks
and a DP group ``t·d``. Within one 8-GPU node ``B`` is the GPU's NVLink bandwidth per direction
(``GPUSpec``). A group spanning nodes has ``k`` ranks on each (``8/t`` for a DP group); its rings
leave every node once per channel and NCCL spreads the channels over those ranks' NICs, so ``B =
min(NVLink, k × NIC)``: the full node's NICs for TP=1, one NIC (50 GB/s on H100) for TP=8.

- **TP**: each layer all-reduces an ``e·s·b·h`` activation twice in the forward (attention and MLP
  outputs) and twice in the backward (their input gradients); with sequence parallelism each
  all-reduce becomes a reduce-scatter plus an all-gather, the same bytes. Full recompute repeats the
  forward's two. The first stage adds the embedding's all-reduce, the last the output layer's. Over
  the ``m`` micro-batches: ``tp_comm = (L/p·(4 + 2·full) + ends) · e·(gbs·s/d)·h · 2(t-1)/t / B``.
  It runs on the critical path (megatron-core's TP communication overlap is not turned on), an upper
  bound: the backward's input-gradient all-reduce partly hides under the weight-gradient GEMM.
- **DP gradients**: DDP reduces the fp32 ``main_grad`` buffer (``grad_reduce_in_fp32``), ``4·P_r``
  bytes: a reduce-scatter with the distributed optimizer, an all-reduce without.
- **DP parameters**: the distributed optimizer all-gathers the updated parameters, ``P_r × 2``
  bytes (bf16/fp8; ``× 4`` in fp32).

With ``parallel.overlap_grad_reduce`` the gradient reduction runs bucket by bucket during the last
micro-batch's backward and costs only what does not fit under it, ``max(0, grad_comm - bwd)``, with
``bwd`` that micro-batch's backward compute; with ``parallel.overlap_param_gather`` the all-gather
hides under the first micro-batch's forward the same way, ``max(0, param_comm - fwd)``. Off, each
adds fully. Unset, both are on (the trainer's default on CUDA, and plans are for GPUs; the
parameter all-gather only exists with the distributed optimizer). Not modeled: pipeline
send/receive (small, and overlapped by 1F1B), the cross-entropy's per-token all-reduces, the
latency of small messages, link efficiency below the datasheet figure (nccl-tests typically reach
80-90% of it: plans err fast on communication).

Time per step ``= (compute + tp_comm) × (1 + bubble) + exposed DP communication``, with
``compute = tokens_per_step × F / (gpus × peak × mfu)``: ``F`` are the FLOPs executed per token,
``6·N + 6·L·h·s`` (fwd + bwd over all parameters ``N``, plus the attention scores and values,
``12·L·h·s`` halved for the causal mask) — the same count the training console uses for its MFU
(``specialize/flops.py``). Selective recompute adds the attention forward, ``2·L·h·s``; full
recompute a whole forward of the layers, ``2·N_layers + 2·L·h·s`` (about ``8·N`` in all). ``mfu``
(default 0.40, BF16) is the fraction of the dense BF16 peak the compute achieves on those FLOPs,
the compute alone: an MFU read off a run also paid for the run's exposed communication, so giving
it as ``--mfu`` counts that twice (a pessimistic plan). The 1F1B bubble is
``(p - 1)/m``. FP8 runs the GEMM FLOPs (all but the ``L·h·s`` attention terms, which Flash Attention
keeps in bf16) ``fp8_speedup`` times faster; the default 1.3 is the FP8/BF16 peak ratio (2.0 on
H100/H200) × 0.65, close to the gains in the references (torchtitan Llama3.1-8B +Float8: 1.28×;
Megatron-Bridge Llama3-8B FP8 744 vs Qwen3-8B BF16 513 TFLOP/s/GPU, different setups: 1.45×). A100
has no FP8: asking for it is an error. Totals: steps (``train.steps``, or
``ceil(train.tokens / tokens_per_step)``) × step time; GPU-hours = hours × gpus.

The recommendation searches TP in {1, 2, 4, 8} (TP within one 8-GPU node), every PP, micro-batches
1, 2, 4, ..., recompute none/selective/full and sequence parallelism on/off, with the distributed
optimizer on; every candidate is checked by ``specialize.config.check_layout``, the function the
trainer's config validation runs (heads, query groups and FFN divisible by TP, layers by PP, the
global batch by micro-batch × DP, sequence parallelism only with TP > 1 and the te spec, packed SFT
with the te spec at micro-batch 1, FP8 only with the te spec), so a recommended layout is one the
trainer accepts. It picks the fastest layout that fits (ties go to smaller TP, then smaller PP, then
the larger micro-batch, then less recompute, then SP on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from base.presets import QwenPreset
from specialize.config import ConfigError, check_layout, load_config, stage_configs
from specialize.flops import FP8_PEAK_TFLOPS, PEAK_TFLOPS, TF32_PEAK_TFLOPS, flops_per_token

GiB = 1024**3
DEFAULT_MFU = 0.40
DEFAULT_HEADROOM = 0.90
FP8_EFFICIENCY = 0.65
"""Fraction of the FP8/BF16 peak ratio realized on GEMMs (default speedup 2.0 × 0.65 = 1.3)."""
GPU_RUNTIME_BYTES = 3 * GiB
GPUS_PER_NODE = 8
RECOMPUTE = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp8")


class PlanError(ValueError):
    """A plan that cannot be made: unknown GPU, FP8 without FP8 hardware, nothing fits."""


@dataclass(frozen=True)
class GPUSpec:
    name: str
    memory_bytes: int
    """Device memory (the marketed 80 GB of H100/A100 are 80 GiB; H200's 141 GB ≈ 140 GiB)."""
    bf16_tflops: float
    """Dense BF16 peak (``specialize.flops``)."""
    fp8_tflops: Optional[float]
    """Dense FP8 peak; None: no FP8 tensor cores."""
    tf32_tflops: float
    """Dense TF32 peak (used for fp32 recipes)."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU and direction, GB/s (half the datasheet's bidirectional figure)."""
    network_gbps: float
    """Inter-node bandwidth per GPU and direction, GB/s (one InfiniBand NIC per GPU, as in DGX)."""


def _gpu(name: str, memory_bytes: int, nvlink_gbps: float, network_gbps: float) -> GPUSpec:
    """A GPU with its peaks from ``specialize.flops`` (no FP8 entry: no FP8 tensor cores)."""
    peaks = (PEAK_TFLOPS[name], FP8_PEAK_TFLOPS.get(name), TF32_PEAK_TFLOPS[name])
    return GPUSpec(name, memory_bytes, *peaks, nvlink_gbps, network_gbps)


# NVLink: H100/H200 SXM 900 GB/s, A100 SXM 600 GB/s bidirectional (NVIDIA datasheets,
# nvidia.com/en-us/data-center/{h100,h200,a100}). Network: DGX H100/H200 have one 400 Gb/s NDR
# ConnectX-7 per GPU (docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html), DGX
# A100 one 200 Gb/s HDR ConnectX-6 (docs.nvidia.com/dgx/dgxa100-user-guide).
GPUS: dict[str, GPUSpec] = {
    "h100": _gpu("H100", 80 * GiB, 450.0, 50.0),
    "h200": _gpu("H200", 140 * GiB, 450.0, 50.0),
    "a100": _gpu("A100", 80 * GiB, 300.0, 25.0),
}


def get_gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


def _act_bytes(dtype: str) -> int:
    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return 4 if dtype == "fp32" else 2


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank, by term, for one pipeline stage."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    temporaries: int = 0
    runtime: int = 0
    params: int = 0
    """Parameters on this rank (not bytes)."""
    stage: int = 0
    """Pipeline stage these numbers are for."""
    in_flight: int = 1
    """Micro-batches whose activations the stage holds at its peak."""

    TERMS = ("weights", "gradients", "optimizer", "activations", "logits", "temporaries", "runtime")

    @property
    def total(self) -> int:
        return sum(getattr(self, k) for k in self.TERMS)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.TERMS} | {"total": self.total}


def _layer_params(preset: QwenPreset, tp: int) -> tuple[int, int]:
    """(parameters of one layer on a TP rank, of which in GEMM weights)."""
    h, f = preset.hidden_size, preset.ffn_hidden_size
    kv = preset.query_groups * preset.kv_channels
    gemm = h * (h + 2 * kv) + h * h + 3 * h * f
    return (gemm + (h + 2 * kv)) // tp + 2 * h, gemm // tp


def stage_params(preset: QwenPreset, tp: int, pp: int, stage: int) -> tuple[int, int]:
    """(parameters on a rank of pipeline stage ``stage``, of which in transformer GEMM weights)."""
    layer, gemm = _layer_params(preset, tp)
    n = preset.num_layers // pp
    params, gemm_params = n * layer, n * gemm
    vh = preset.padded_vocab_size * preset.hidden_size // tp
    if stage == 0:
        params += vh
    if stage == pp - 1:
        params += vh + preset.hidden_size
    return params, gemm_params


def layer_activation_bytes(
    preset: QwenPreset,
    seq_len: int,
    micro_batch: int,
    tp: int,
    dtype: str,
    recompute: str = "none",
    sequence_parallel: bool = False,
    flash_attention: bool = False,
    hidden_dropout: bool = False,
    attention_dropout: bool = False,
) -> int:
    """Activations one layer keeps for its backward, for one micro-batch (Korthikanti, adapted)."""
    if recompute not in RECOMPUTE:
        raise PlanError(f"recompute {recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    e = _act_bytes(dtype)
    s, b, h, f = seq_len, micro_batch, preset.hidden_size, preset.ffn_hidden_size
    a = preset.num_attention_heads
    kv = preset.query_groups * preset.kv_channels
    sb = s * b
    masks = 2 * h * sb if hidden_dropout else 0
    # Replicated across TP ranks without SP: both norm inputs, the QKV and fc1 GEMM inputs, masks.
    replicated = e * 4 * h * sb + masks
    split = e * (2 * h + 2 * kv + 3 * f) * sb  # Q, K, V, proj input, [gate; up], fc2 input
    scores = 0
    if not flash_attention and recompute == "none":
        scores = a * s * s * b * (e + ((1 + e) if attention_dropout else 0))
    if sequence_parallel:
        return (replicated + split + scores) // tp
    return replicated + split // tp + scores // tp


def estimate_memory(
    preset: QwenPreset,
    seq_len: int,
    micro_batch: int,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    dtype: str = "bf16",
    distributed_optimizer: bool = False,
    recompute: str = "none",
    sequence_parallel: bool = False,
    *,
    micro_batches: Optional[int] = None,
    flash_attention: bool = False,
    hidden_dropout: bool = False,
    attention_dropout: bool = False,
    runtime_bytes: int = 0,
    chunk_tokens: Optional[int] = None,
) -> MemoryEstimate:
    """Per-rank memory of the pipeline stage that needs the most (see the module docstring).

    ``micro_batches`` per step bounds the 1F1B in-flight count (default: ``pp``, the worst case);
    ``chunk_tokens``: the chunked output layer + loss with chunks of that many tokens (None:
    megatron-core's, which holds every logit).
    """
    e = _act_bytes(dtype)
    if micro_batches is None:
        micro_batches = pp
    worst: Optional[MemoryEstimate] = None
    layers = preset.num_layers // pp
    kw = dict(
        flash_attention=flash_attention,
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
    )
    layer_full = layer_activation_bytes(
        preset, seq_len, micro_batch, tp, dtype, "none", sequence_parallel, **kw
    )
    layer = layer_activation_bytes(
        preset, seq_len, micro_batch, tp, dtype, recompute, sequence_parallel, **kw
    )
    sbh = seq_len * micro_batch * preset.hidden_size
    if recompute == "full":  # layer inputs kept; one layer's activations during its recompute
        layer = e * sbh // (tp if sequence_parallel else 1)
    for stage in sorted({0, pp - 1}):
        params, gemm = stage_params(preset, tp, pp, stage)
        weights = params * (4 if dtype == "fp32" else 2) + (2 * gemm if dtype == "fp8" else 0)
        state = params * (8 if dtype == "fp32" else 12)
        optimizer = math.ceil(state / dp) if distributed_optimizer else state
        in_flight = min(pp - stage, micro_batches)
        activations = in_flight * layers * layer
        if recompute == "full":
            activations += layer_full
        logits = 0
        vocab_rows = preset.padded_vocab_size if stage in (0, pp - 1) else 0
        if stage == pp - 1:
            inputs = 2 * e * sbh // (tp if sequence_parallel else 1)
            per_token = preset.padded_vocab_size // tp * (4 + (e if e != 4 else 0))
            if chunk_tokens is None:
                logits = seq_len * micro_batch * per_token + inputs
            else:
                accumulator = (
                    preset.padded_vocab_size * preset.hidden_size // tp * 4 if e != 4 else 0
                )
                rows = min(chunk_tokens, seq_len * micro_batch)
                logits = rows * per_token + inputs + e * sbh + accumulator
        # The embedding's (dense) or output layer's weight gradient before DDP adds it to main_grad.
        temporaries = vocab_rows * preset.hidden_size // tp * (4 if dtype == "fp32" else 2)
        est = MemoryEstimate(
            weights=weights,
            gradients=params * 4,
            optimizer=optimizer,
            activations=activations,
            logits=logits,
            temporaries=temporaries,
            runtime=runtime_bytes,
            params=params,
            stage=stage,
            in_flight=in_flight,
        )
        if worst is None or est.total > worst.total:
            worst = est
    assert worst is not None
    return worst


# ----------------------------------------------------------------------------- communication


@dataclass(frozen=True)
class CommEstimate:
    """Seconds per step one rank spends in collectives, at its links' bus bandwidth."""

    tp: float = 0.0
    """TP all-reduces (with SP: reduce-scatters and all-gathers) of the layers' activations."""
    grad: float = 0.0
    """DP gradient reduce-scatter (distributed optimizer) or all-reduce."""
    param: float = 0.0
    """The distributed optimizer's parameter all-gather."""
    overlap_grad_reduce: bool = False
    """The gradient reduction hides under the last micro-batch's backward."""
    overlap_param_gather: bool = False
    """The parameter all-gather hides under the first micro-batch's forward."""


def group_bandwidth(gpu: GPUSpec, ranks: int, span: int) -> float:
    """Bus bandwidth (bytes/s) of a group of ``ranks`` spread evenly over ``span`` consecutive
    ranks: NVLink within a node; across nodes each node's ring segment leaves through the NICs of
    the group's members on that node (NCCL spreads its channels over them), up to NVLink speed."""
    if span <= GPUS_PER_NODE:
        return gpu.nvlink_gbps * 1e9
    per_node = max(1, ranks * GPUS_PER_NODE // span)
    return min(gpu.nvlink_gbps, per_node * gpu.network_gbps) * 1e9


def estimate_comm(
    preset: QwenPreset,
    seq_len: int,
    global_batch: int,
    gpu: GPUSpec,
    *,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    dtype: str = "bf16",
    recompute: str = "none",
    distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = True,
    overlap_param_gather: bool = True,
) -> CommEstimate:
    """TP and DP communication per step of the pipeline stage that moves the most (module doc)."""
    e = _act_bytes(dtype)
    tokens = global_batch * seq_len // dp  # this rank's m micro-batches of s·b tokens
    per_layer = 4 + (2 if recompute == "full" else 0)
    collectives, params = 0, 0
    for stage in sorted({0, pp - 1}):
        ends = int(stage == 0) + int(stage == pp - 1)  # embedding, output layer
        collectives = max(collectives, preset.num_layers // pp * per_layer + ends)
        params = max(params, stage_params(preset, tp, pp, stage)[0])
    tp_bytes = collectives * e * tokens * preset.hidden_size
    tp_seconds = tp_bytes * 2 * (tp - 1) / tp / group_bandwidth(gpu, tp, tp)
    ring = (dp - 1) / dp  # reduce-scatter / all-gather; an all-reduce moves twice as much
    dp_bandwidth = group_bandwidth(gpu, dp, tp * dp)
    grad = 4 * params * (ring if distributed_optimizer else 2 * ring) / dp_bandwidth
    param = 0.0
    if distributed_optimizer:
        param = params * (4 if dtype == "fp32" else 2) * ring / dp_bandwidth
    return CommEstimate(
        tp=tp_seconds,
        grad=grad,
        param=param,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather and distributed_optimizer,
    )


# ----------------------------------------------------------------------------- time


@dataclass(frozen=True)
class TimeEstimate:
    dtype: str
    flops_per_token: float
    """Executed FLOPs per token (with recompute)."""
    model_flops_per_token: float
    """6·N + 6·L·h·s, the MFU numerator."""
    step_seconds: float
    tokens_per_second: float
    tokens_per_second_per_gpu: float
    steps: int
    total_tokens: int
    total_seconds: float
    gpu_hours: float
    bubble: float
    mfu: float
    """The assumed fraction of the BF16 peak on executed FLOPs."""
    fp8_speedup: Optional[float] = None
    compute_seconds: float = 0.0
    """Compute per step, without the bubble and communication."""
    comm: CommEstimate = CommEstimate()
    dp_exposed_seconds: float = 0.0
    """The part of the DP communication that does not hide under compute."""


def default_fp8_speedup(gpu: GPUSpec) -> float:
    if gpu.fp8_tflops is None:
        raise PlanError(f"{gpu.name} has no FP8 tensor cores: plan it with --dtype bf16")
    return gpu.fp8_tflops / gpu.bf16_tflops * FP8_EFFICIENCY


def estimate_time(
    preset: QwenPreset,
    seq_len: int,
    global_batch: int,
    gpus: int,
    gpu: GPUSpec,
    *,
    steps: int,
    dtype: str = "bf16",
    mfu: float = DEFAULT_MFU,
    recompute: str = "none",
    pp: int = 1,
    micro_batches: int = 1,
    fp8_speedup: Optional[float] = None,
    comm: CommEstimate = CommEstimate(),
) -> TimeEstimate:
    """Step time, throughput and totals for ``steps`` steps of ``global_batch × seq_len`` tokens.

    ``comm`` (default: none) is the layout's communication; the step pays what does not overlap.
    """
    if not 0 < mfu <= 1:
        raise PlanError(f"mfu={mfu}: expected a fraction in (0, 1]")
    executed, model, gemm = flops_per_token(preset, seq_len, recompute)
    peak = (gpu.tf32_tflops if dtype == "fp32" else gpu.bf16_tflops) * 1e12
    if dtype == "fp8":
        if fp8_speedup is None:
            fp8_speedup = default_fp8_speedup(gpu)
        elif gpu.fp8_tflops is None:
            default_fp8_speedup(gpu)  # raises
        effective = gemm / fp8_speedup + (executed - gemm)
    else:
        fp8_speedup = None
        effective = executed
    tokens_per_step = global_batch * seq_len
    bubble = (pp - 1) / micro_batches
    compute = tokens_per_step * effective / (gpus * peak * mfu)
    # One micro-batch's forward (2N + 2Lhs = model / 3 FLOPs) and backward (the rest, recompute
    # included) are the windows the DP all-gather and reduce-scatter can hide in.
    forward = compute / micro_batches * (model / 3) / executed
    backward = compute / micro_batches - forward
    grad = max(0.0, comm.grad - backward) if comm.overlap_grad_reduce else comm.grad
    param = max(0.0, comm.param - forward) if comm.overlap_param_gather else comm.param
    step = (compute + comm.tp) * (1 + bubble) + grad + param
    total = steps * step
    return TimeEstimate(
        dtype=dtype,
        flops_per_token=executed,
        model_flops_per_token=model,
        step_seconds=step,
        tokens_per_second=tokens_per_step / step,
        tokens_per_second_per_gpu=tokens_per_step / step / gpus,
        steps=steps,
        total_tokens=steps * tokens_per_step,
        total_seconds=total,
        gpu_hours=total / 3600 * gpus,
        bubble=bubble,
        mfu=mfu,
        fp8_speedup=fp8_speedup,
        compute_seconds=compute,
        comm=comm,
        dp_exposed_seconds=grad + param,
    )


# ----------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Parallelism:
    """A layout the trainer runs: TP/PP/DP sizes, micro-batching, recompute and optimizer sharding."""

    tp: int
    pp: int
    dp: int
    micro_batch: int
    micro_batches: int
    """Micro-batches per step per data-parallel rank."""
    recompute: str
    sequence_parallel: bool
    distributed_optimizer: bool
    virtual_pipeline: Optional[int] = None
    """Checked (the recipe's), not modeled; recommended layouts have none."""

    def label(self) -> str:
        parts = [f"TP={self.tp} PP={self.pp} DP={self.dp} mb={self.micro_batch}"]
        if self.virtual_pipeline:
            parts.append(f"VP={self.virtual_pipeline}")
        if self.sequence_parallel:
            parts.append("SP")
        if self.distributed_optimizer:
            parts.append("dist-opt")
        parts.append(f"recompute={self.recompute}")
        return " ".join(parts)

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that give a recipe this layout."""
        return [
            f"parallel.tensor={self.tp}",
            f"parallel.pipeline={self.pp}",
            f"parallel.sequence_parallel={str(self.sequence_parallel).lower()}",
            f"parallel.distributed_optimizer={str(self.distributed_optimizer).lower()}",
            f"train.micro_batch_size={self.micro_batch}",
            f"model.recompute={self.recompute}",
        ]


@dataclass(frozen=True)
class Workload:
    """What the estimates need from a recipe."""

    preset: QwenPreset
    seq_len: int
    global_batch: int
    steps: int
    dtype: str
    flash_attention: bool
    hidden_dropout: bool
    attention_dropout: bool
    spec: str = "te"
    """The layer spec the run builds on GPUs: ``te`` (for ``te`` and ``auto``) or ``local``."""
    data_format: str = "pretrain"
    overlap_grad_reduce: bool = True
    """The recipe's ``parallel.overlap_grad_reduce`` (unset: on)."""
    overlap_param_gather: bool = True
    """The recipe's ``parallel.overlap_param_gather`` (unset: on with the distributed optimizer)."""
    chunk_tokens: Optional[int] = None
    """Tokens per chunk of the chunked output layer + loss, or None for megatron-core's fused
    cross entropy, which GPU runs use unless ``train.chunked_cross_entropy`` is true."""


def memory_of(
    work: Workload, layout: Parallelism, dtype: str, runtime_bytes: int
) -> MemoryEstimate:
    return estimate_memory(
        work.preset,
        work.seq_len,
        layout.micro_batch,
        layout.tp,
        layout.pp,
        layout.dp,
        dtype,
        layout.distributed_optimizer,
        layout.recompute,
        layout.sequence_parallel,
        micro_batches=layout.micro_batches,
        flash_attention=work.flash_attention,
        hidden_dropout=work.hidden_dropout,
        attention_dropout=work.attention_dropout,
        runtime_bytes=runtime_bytes,
        chunk_tokens=work.chunk_tokens,
    )


def time_of(
    work: Workload,
    layout: Parallelism,
    gpus: int,
    gpu: GPUSpec,
    dtype: str,
    *,
    mfu: float = DEFAULT_MFU,
    fp8_speedup: Optional[float] = None,
) -> TimeEstimate:
    """Step time and totals of ``layout``, communication included."""
    comm = estimate_comm(
        work.preset,
        work.seq_len,
        work.global_batch,
        gpu,
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        dtype=dtype,
        recompute=layout.recompute,
        distributed_optimizer=layout.distributed_optimizer,
        overlap_grad_reduce=work.overlap_grad_reduce,
        overlap_param_gather=work.overlap_param_gather,
    )
    return estimate_time(
        work.preset,
        work.seq_len,
        work.global_batch,
        gpus,
        gpu,
        steps=work.steps,
        dtype=dtype,
        mfu=mfu,
        recompute=layout.recompute,
        pp=layout.pp,
        micro_batches=layout.micro_batches,
        fp8_speedup=fp8_speedup,
        comm=comm,
    )


def make_layout(
    work: Workload,
    gpus: int,
    tp: int,
    pp: int,
    micro_batch: int,
    recompute: str,
    sequence_parallel: bool,
    distributed_optimizer: bool,
    virtual_pipeline: Optional[int] = None,
) -> Parallelism:
    """A layout the trainer accepts: checked by ``check_layout``, as ``validate`` checks recipes."""
    if recompute not in RECOMPUTE:
        raise PlanError(f"recompute {recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    sequence_parallel = sequence_parallel and tp > 1  # nothing to shard at TP=1
    try:
        check_layout(
            work.preset,
            tensor=tp,
            pipeline=pp,
            virtual_pipeline=virtual_pipeline,
            sequence_parallel=sequence_parallel,
            micro_batch_size=micro_batch,
            global_batch_size=work.global_batch,
            seq_length=work.seq_len,
            spec=work.spec,
            dtype=work.dtype,
            data_format=work.data_format,
            world_size=gpus,
        )
    except ConfigError as e:
        raise PlanError(f"TP={tp} PP={pp} mb={micro_batch}: {e}") from None
    dp = gpus // (tp * pp)
    return Parallelism(
        tp=tp,
        pp=pp,
        dp=dp,
        micro_batch=micro_batch,
        micro_batches=work.global_batch // (micro_batch * dp),
        recompute=recompute,
        sequence_parallel=sequence_parallel,
        distributed_optimizer=distributed_optimizer,
        virtual_pipeline=virtual_pipeline,
    )


@dataclass(frozen=True)
class Candidate:
    layout: Parallelism
    memory: MemoryEstimate
    time: TimeEstimate
    fits: bool


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_headroom(headroom: float) -> None:
    if not 0 < headroom <= 1:
        raise PlanError(f"--headroom {headroom}: expected the fraction of GPU memory in (0, 1]")


def recommend(
    work: Workload,
    gpus: int,
    gpu: GPUSpec,
    *,
    dtype: Optional[str] = None,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    mfu: float = DEFAULT_MFU,
    headroom: float = DEFAULT_HEADROOM,
    fp8_speedup: Optional[float] = None,
    runtime_bytes: int = GPU_RUNTIME_BYTES,
) -> Candidate:
    """The fastest layout the trainer accepts whose per-rank memory is within ``headroom`` of the
    GPU's memory.

    ``tp``/``pp`` pin those sizes. Raises ``PlanError`` when no layout is valid or none fits.
    """
    _check_headroom(headroom)
    dtype = dtype or work.dtype
    work = replace(work, dtype=dtype)
    p = work.preset
    budget = headroom * gpu.memory_bytes
    tps = [tp] if tp else [t for t in (1, 2, 4, 8) if t <= gpus]
    pps = [pp] if pp else _divisors(p.num_layers)
    best: Optional[tuple[tuple, Candidate]] = None
    smallest: Optional[Candidate] = None
    refused: Optional[PlanError] = None
    for t in tps:
        for q in pps:
            dp = 0 if gpus % (t * q) else gpus // (t * q)
            if not dp or work.global_batch % dp:  # keep the trainer's reason, should none be valid
                try:
                    make_layout(work, gpus, t, q, 1, "none", True, True)
                except PlanError as e:
                    refused = refused or e
                continue
            mb = 1
            while work.global_batch % (mb * dp) == 0:
                for sp in (True, False) if t > 1 else (False,):
                    try:
                        valid = make_layout(work, gpus, t, q, mb, "none", sp, True)
                    except PlanError as e:
                        refused = refused or e
                        continue
                    for rc in RECOMPUTE:
                        layout = replace(valid, recompute=rc)
                        mem = memory_of(work, layout, dtype, runtime_bytes)
                        tm = time_of(
                            work, layout, gpus, gpu, dtype, mfu=mfu, fp8_speedup=fp8_speedup
                        )
                        cand = Candidate(layout, mem, tm, mem.total <= budget)
                        if smallest is None or mem.total < smallest.memory.total:
                            smallest = cand
                        if cand.fits:
                            order = (t, q, -mb, RECOMPUTE.index(rc), not sp)
                            key = (round(tm.step_seconds, 9), *order)
                            if best is None or key < best[0]:
                                best = (key, cand)
                mb *= 2
    if best is None:
        if smallest is None:
            raise PlanError(
                f"no valid layout of {p.name} on {gpus} GPU(s) (TP={tp or 'any'}, "
                f"PP={pp or 'any'}, global batch {work.global_batch})"
                + (f"; e.g. {refused}" if refused else "")
            )
        raise PlanError(
            f"nothing fits: {p.name} at seq {work.seq_len} on {gpus}x{gpu.name} needs at least "
            f"{smallest.memory.total / GiB:.1f} GiB per GPU ({smallest.layout.label()}), over "
            f"{headroom:.0%} of {gpu.memory_bytes / GiB:.0f} GiB; use more GPUs"
        )
    return best[1]


# ----------------------------------------------------------------------------- plan


@dataclass
class PlanResult:
    recipe: str
    gpus: int
    gpu: GPUSpec
    work: Workload
    headroom: float
    requested: Optional[Candidate]
    """The recipe's layout (or --tp/--pp) with its micro-batch, recompute, SP and optimizer; None
    when the trainer would refuse it on this GPU count."""
    variants: list[tuple[str, MemoryEstimate]]
    """The requested layout's memory with/without distributed optimizer, SP and recompute."""
    recommended: Candidate
    times: list[tuple[str, TimeEstimate]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)
    """Recipe overrides that run the recommended layout (and the spec and dtype it assumes)."""


def workload(cfg) -> Workload:
    """The numbers a plan needs from a (single-stage) ``RecipeConfig``."""
    spec, train, par = cfg.model.resolved_spec(te_available=True), cfg.train, cfg.parallel
    tokens_per_step = train.global_batch_size * cfg.data.seq_length
    steps = train.steps if train.steps is not None else math.ceil(train.tokens / tokens_per_step)
    return Workload(
        preset=cfg.model.architecture(),
        seq_len=cfg.data.seq_length,
        global_batch=train.global_batch_size,
        steps=steps,
        dtype=cfg.precision.dtype,
        flash_attention=spec == "te",  # TE's fused attention
        hidden_dropout=cfg.model.hidden_dropout > 0,
        attention_dropout=cfg.model.attention_dropout > 0,
        spec=spec,
        data_format=cfg.data.format,
        overlap_grad_reduce=par.overlap_grad_reduce is not False,
        overlap_param_gather=par.overlap_param_gather is not False,
        chunk_tokens=train.cross_entropy_chunk_tokens if train.chunked_cross_entropy else None,
    )


def _overlap_note(work: Workload) -> str:
    grad = "overlapped with the backward" if work.overlap_grad_reduce else "not overlapped"
    param = "overlapped with the forward" if work.overlap_param_gather else "not overlapped"
    return (
        f"DP communication: gradient reduction {grad} (parallel.overlap_grad_reduce), "
        f"distributed optimizer's parameter all-gather {param} (parallel.overlap_param_gather); "
        f"TP communication on the critical path; groups within one {GPUS_PER_NODE}-GPU node use "
        "NVLink, wider ones the network."
    )


def plan(
    recipe_cfg,
    gpus: int,
    gpu: str | GPUSpec,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    mfu: float = DEFAULT_MFU,
    *,
    micro_batch: Optional[int] = None,
    dtype: Optional[str] = None,
    headroom: float = DEFAULT_HEADROOM,
    fp8_speedup: Optional[float] = None,
) -> PlanResult:
    """Memory, a recommended layout and time for ``recipe_cfg`` on ``gpus`` GPUs of type ``gpu``."""
    g = get_gpu(gpu) if isinstance(gpu, str) else gpu
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: need at least one GPU")
    _check_headroom(headroom)
    work = workload(recipe_cfg)
    if dtype is not None:
        work = replace(work, dtype=dtype)
    _act_bytes(work.dtype)
    if work.dtype == "fp8" and g.fp8_tflops is None:
        raise PlanError(f"{g.name} has no FP8 tensor cores: plan it with --dtype bf16")
    par = recipe_cfg.parallel
    notes = []
    try:
        layout: Optional[Parallelism] = make_layout(
            work,
            gpus,
            tp or par.tensor,
            pp or par.pipeline,
            micro_batch or recipe_cfg.train.micro_batch_size,
            recipe_cfg.model.recompute,
            par.sequence_parallel,
            par.distributed_optimizer,
            par.virtual_pipeline,
        )
    except PlanError as e:
        layout = None
        notes.append(f"the trainer would refuse the recipe's layout on {gpus} GPU(s): {e}")
    budget = headroom * g.memory_bytes

    def timed(lay: Parallelism, dt: str) -> TimeEstimate:
        return time_of(work, lay, gpus, g, dt, mfu=mfu, fp8_speedup=fp8_speedup)

    requested, variants = None, []
    if layout is not None:
        mem = memory_of(work, layout, work.dtype, GPU_RUNTIME_BYTES)
        requested = Candidate(layout, mem, timed(layout, work.dtype), mem.total <= budget)
    for dist_opt in (False, True) if layout is not None else ():
        for sp in sorted({False, layout.tp > 1 and work.spec == "te"}):
            for rc in RECOMPUTE:
                v = replace(
                    layout, distributed_optimizer=dist_opt, sequence_parallel=sp, recompute=rc
                )
                label = f"dist-opt {'on' if dist_opt else 'off'}, SP {'on' if sp else 'off'}, {rc}"
                variants.append((label, memory_of(work, v, work.dtype, GPU_RUNTIME_BYTES)))
    recommended = recommend(
        work, gpus, g, tp=tp, pp=pp, mfu=mfu, headroom=headroom, fp8_speedup=fp8_speedup
    )
    overrides = recommended.layout.overrides()
    if par.virtual_pipeline is not None:
        overrides.append("parallel.virtual_pipeline=null")
    if recipe_cfg.model.spec != work.spec:
        overrides.append(f"model.spec={work.spec}")
    if recipe_cfg.precision.dtype != work.dtype:
        overrides.append(f"precision.dtype={work.dtype}")
    result = PlanResult(
        recipe=recipe_cfg.name,
        gpus=gpus,
        gpu=g,
        work=work,
        headroom=headroom,
        requested=requested,
        variants=variants,
        recommended=recommended,
        notes=notes,
        overrides=overrides,
    )
    fp8 = g.fp8_tflops is not None and work.spec == "te"
    dtypes = ["bf16", "fp8"] if fp8 else ["bf16"]
    if work.dtype == "fp32":
        dtypes = ["fp32", *dtypes]
    for name, cand in (("recipe", requested), ("recommended", recommended)):
        if cand is None or (name == "recommended" and requested and cand.layout == layout):
            continue
        for dt in dtypes:
            result.times.append((f"{name} {dt}", timed(cand.layout, dt)))
    if layout is not None and layout.distributed_optimizer:
        result.notes.append(optimizer_load_note(work.preset, layout.tp, layout.pp, min(gpus, 8)))
    if g.fp8_tflops is None:
        result.notes.append(f"{g.name} has no FP8: BF16 only.")
    elif not fp8:
        result.notes.append("model.spec=local has no FP8 GEMMs: BF16 only.")
    else:
        speed = fp8_speedup or default_fp8_speedup(g)
        result.notes.append(
            f"FP8: GEMM FLOPs {speed:.2f}x faster than BF16 (attention stays BF16); "
            "memory counted as BF16 plus FP8 weight copies."
        )
    result.notes.append(_overlap_note(work))
    return result


def optimizer_load_note(preset: QwenPreset, tp: int, pp: int, gpus_per_node: int) -> str:
    """Host memory of loading fully reshardable distributed-optimizer state (a run's final
    checkpoint, see ``specialize/checkpoint.py``): megatron-core 0.16.1 has every rank hold its
    TP/PP shard's whole fp32 weights and Adam moments, 12 bytes per parameter, to keep 1/DP."""
    per_gpu = 12 * max(stage_params(preset, tp, pp, stage)[0] for stage in range(pp))
    return (
        f"loading the optimizer state of a final (fully reshardable) checkpoint holds "
        f"{_gib(per_gpu)} GiB of host memory per GPU ({_gib(per_gpu * gpus_per_node)} GiB per "
        f"{gpus_per_node}-GPU node); the dp_reshardable checkpoints before it load 1/DP of that"
    )


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.2f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds:.1f} s"


def format_plan(result: PlanResult) -> str:
    """The plan as markdown tables."""
    w, g, req, rec = result.work, result.gpu, result.requested, result.recommended
    budget = result.headroom * g.memory_bytes
    lines = [
        f"# plan: {result.recipe} — {w.preset.name} ({w.preset.num_params() / 1e9:.2f}B params), "
        f"{result.gpus}x{g.name} ({g.memory_bytes / GiB:.0f} GiB, {g.bf16_tflops:g} TFLOP/s BF16"
        f"{f', {g.fp8_tflops:g} FP8' if g.fp8_tflops else ''}; NVLink {g.nvlink_gbps:g} GB/s, "
        f"network {g.network_gbps:g} GB/s per direction)",
        "",
        f"seq {w.seq_len}, global batch {w.global_batch} "
        f"({w.global_batch * w.seq_len:,} tokens/step), {w.steps:,} steps = "
        f"{w.steps * w.global_batch * w.seq_len:.3g} tokens, {w.dtype}, {w.spec} spec"
        f"{', flash attention' if w.flash_attention else ''}; fits = total <= "
        f"{result.headroom:.0%} of HBM ({_gib(budget)} GiB), leaving "
        f"{_gib(g.memory_bytes - budget)} GiB free for the allocator's cache and fragmentation",
        "",
        "## memory per GPU (GiB), worst pipeline stage",
        "",
        "| layout | weights | grads | optimizer | activations | logits | temp | runtime | total "
        "| fits |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cand in (("recipe", req), ("recommended", rec)):
        if cand is None:
            continue
        m = cand.memory
        terms = (m.weights, m.gradients, m.optimizer, m.activations, m.logits, m.temporaries)
        lines.append(
            f"| {name}: {cand.layout.label()} | {' | '.join(_gib(x) for x in terms)} "
            f"| {_gib(m.runtime)} | {_gib(m.total)} | {'yes' if cand.fits else 'NO'} |"
        )
    if req is not None:
        lines += [
            "",
            f"## recipe layout TP={req.layout.tp} PP={req.layout.pp} mb={req.layout.micro_batch}: "
            "variants (GiB)",
            "",
            "| variant | optimizer | activations | total | fits |",
            "|---|---|---|---|---|",
        ]
    for label, m in result.variants:
        lines.append(
            f"| {label} | {_gib(m.optimizer)} | {_gib(m.activations)} | {_gib(m.total)} | "
            f"{'yes' if m.total <= budget else 'NO'} |"
        )
    lines += [
        "",
        f"## time (MFU {rec.time.mfu:.2f} of the BF16 peak on executed FLOPs)",
        "",
        "| layout, dtype | FLOPs/token | compute | TP comm | DP comm exposed / total | step "
        "| tokens/s | tokens/s/GPU | bubble | total | GPU-hours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, t in result.times:
        dp_total = t.comm.grad + t.comm.param
        lines.append(
            f"| {label} | {t.flops_per_token:.3g} | {t.compute_seconds:.2f} s | "
            f"{t.comm.tp:.2f} s | {t.dp_exposed_seconds:.2f} / {dp_total:.2f} s | "
            f"{t.step_seconds:.2f} s | {t.tokens_per_second:,.0f} | "
            f"{t.tokens_per_second_per_gpu:,.0f} | {t.bubble:.0%} | "
            f"{_duration(t.total_seconds)} | {t.gpu_hours:,.0f} |"
        )
    lines += [
        "",
        f"recommended: {rec.layout.label()}",
        f"recommended overrides: {' '.join(result.overrides)}",
    ]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- recipes


def load_recipe_for_plan(path: str, overrides: list[str] = ()) -> list:
    """The recipe's config(s): one per stage for a staged recipe. ``init`` is not needed."""
    cfg = load_config(path, [*overrides, "init.checkpoint=null", "init.verify_against=null"])
    return stage_configs(cfg) if cfg.stages else [cfg]
