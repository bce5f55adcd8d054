"""Memory per GPU of a training run: a formula, and a trace of the real training step on fake
tensors.

    python train.py config/7b.py --dry-run --world-size=8            # the formula, at once
    python train.py config/7b.py --dry-run --world-size=8 --trace    # and the traced step (seconds)

The trace runs the training code it is given (train.py passes its Recipe: build_model with the
full fp32 initialisation then FSDP2 with its bf16 policy, make_optimizer, the DDP wrapping and
train_step itself) on FakeTensorMode tensors (shapes, dtypes and devices, no data) with a fake
process group of any world size, and PyTorch's memory trackers (FSDPMemTracker under FSDP,
MemTracker otherwise) add up every tensor alive at each moment. It runs the CPU kernels: the CUDA
context, cuBLAS and NCCL buffers and the allocator's fragmentation are not traced, and a fixed
reserve stands for them. The pre-run check on CUDA uses the formula (tests keep the two together);
the trace, which needs torch's testing internals, runs only when asked for.
"""

import contextlib
import dataclasses
import socket
import time
from typing import Callable

import torch

from config import TrainConfig, plan_batch
from infra.distributed import RankError, Runtime, StopVote, compute_dtype
from infra.distributed import autocast as distributed_autocast
from model import LOSS_CHUNK_ELEMENTS, Transformer

GiB = 2**30
# The CUDA context (~0.5 GiB), cuBLAS workspaces and NCCL's buffers: never traced.
CUDA_RESERVE = 2 * GiB


# ----------------------------------------------------------------------------- the formula


def estimate_memory(cfg: TrainConfig, world_size: int) -> dict:
    """Bytes per GPU at the peak of a training step, by category; and the peak while building the
    model.

    Persistent: fp32 weights and gradients (FSDP reduce-scatters every micro-step, so both stay
    sharded) and two fp32 AdamW moments, 16 bytes per parameter, divided by the world size under
    FSDP. With optimizer=muon the blocks' matrices keep one fp32 momentum buffer instead of the
    two moments. FSDP keeps the root group (embedding, head, final norm) gathered in bf16 all step,
    and one block gathered while it computes. DDP adds its fp32 gradient buckets when accumulating
    (the non-final micro-steps accumulate into gradients of their own; with one micro-step the
    gradients are views of the buckets).

    Activations, per token of a micro-batch: with checkpointing each block keeps only its input (the
    residual stream: bf16 under FSDP's policy, fp32 under autocast); without, a block keeps
    e(4 ffn + 2 dim + 2 kv_dim) bytes of matmul outputs in the compute dtype (e bytes each) plus
    (16 + 2e) dim for its two norms (fp32 input and normalised value, the output). The peak is the
    larger of two moments. In a block's backward: one block recomputed plus two ffn-wide gradients,
    the logits the step holds (e vocab), and under FSDP the next block's all-gather and this one's
    fp32 reduce-scatter buffer. In the loss's backward: the bf16 logits, the fp32 log-softmax
    output, its gradient and its input's gradient ((e + 12) vocab); autocast also still holds its
    bf16 copy of every weight (2 bytes per parameter), cached until the forward ends. A micro-batch
    of more tokens than one loss chunk (model.chunked_cross_entropy) keeps no logits through the
    step, and its loss's backward holds one chunk's, plus a second copy of the head's gradient while
    it accumulates.

    With init_from, FSDP allocates only each rank's shards and reads them from the files: no full
    model.
    """
    with torch.device("meta"):
        model = Transformer(cfg.model)
    m, n_params = cfg.model, model.num_params()
    plan = plan_batch(cfg, world_size)
    tokens = plan.micro_batch_size * m.max_seq_len
    sharded, autocast = cfg.parallel == "fsdp", cfg.parallel != "fsdp" and cfg.dtype != "float32"
    # Bytes of the compute dtype on a GPU ("auto" is bf16 there).
    e = 4 if cfg.dtype == "float32" else 2
    stream = e if sharded else 4
    ffn, kv_dim = m.hidden_dim, m.kv_heads * m.head_dim
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = n_params - m.n_layers * block
    shards = world_size if sharded else 1

    per_layer = (
        e * (4 * ffn + 2 * m.dim + 2 * kv_dim)
        + (16 + 2 * e) * m.dim
        + (2 * m.dim if m.dropout else 0)
    )
    kept = tokens * m.n_layers * (m.dim * stream if cfg.activation_checkpointing else per_layer)
    chunk_tokens = max(1, LOSS_CHUNK_ELEMENTS // m.vocab_size)
    chunked = tokens > chunk_tokens
    held_logits = 0 if chunked else e * tokens * m.vocab_size
    block_backward = (
        kept
        + tokens * ((per_layer if cfg.activation_checkpointing else 0) + 2 * e * ffn)
        + held_logits
        + (e * block + 4 * block if sharded else 0)
    )
    loss_backward = (
        kept
        + min(tokens, chunk_tokens) * m.vocab_size * (e + 12)
        + (2 * n_params if autocast else 0)
        + (stream * m.vocab_size * m.dim if chunked else 0)
    )
    estimate = {
        "weights (fp32)": 4 * n_params / shards,
        "gradients (fp32)": 4 * n_params / shards,
    }
    if cfg.optimizer == "muon":
        matrices = sum(p.numel() for p in model.layers.parameters() if p.dim() == 2)
        estimate["Muon + AdamW state (fp32)"] = (8 * n_params - 4 * matrices) / shards
    else:
        estimate["AdamW moments (fp32)"] = 8 * n_params / shards
    if sharded:
        estimate[f"gathered weights ({'bf16' if e == 2 else 'fp32'})"] = e * (root + block)
    if not sharded and world_size > 1 and plan.accum_steps > 1:
        estimate["DDP gradient buckets (fp32)"] = 4 * n_params
    moment = "block backward" if block_backward >= loss_backward else "loss backward"
    estimate[f"activations ({moment})"] = max(block_backward, loss_backward)
    estimate["total"] = sum(estimate.values())
    if not sharded:  # the whole fp32 model on every rank
        estimate["peak at initialisation"] = 4 * n_params
    elif cfg.init_from:  # each rank allocates its shards and reads them from the files
        estimate["peak at initialisation"] = 4 * n_params / shards
    else:  # build_model initialises the whole model on every rank, then copies each group's shard
        estimate["peak at initialisation"] = 4 * n_params + 4 * max(root, block) / shards
    return estimate


# ----------------------------------------------------------------------------- the trace


class _ZeroBatches:
    """Stands in for a step's micro-batches: every one is all token 0. Fetching one marks the start
    of a micro-step: the tracker starts a new iteration (it refuses to see a module run twice
    otherwise), and what is alive then, between two micro-steps, is recorded."""

    def __init__(self, tracker, count: int, shape: tuple, device):
        self.tracker, self.count, self.shape, self.device = tracker, count, shape, device
        self.between_micro_steps = None

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if index >= self.count:
            raise IndexError(index)
        self.tracker.reset_mod_stats()
        snapshot = self.tracker.get_tracker_snapshot("current").get(self.device, {})
        self.between_micro_steps = _sizes(snapshot)
        x = torch.zeros(self.shape, dtype=torch.long, device=self.device)
        return x, torch.zeros_like(x)


def _sizes(snapshot: dict) -> dict:
    """A tracker's snapshot of one device as {category name: bytes}, leaving out empty ones."""
    return {getattr(name, "value", name): size for name, size in snapshot.items() if size}


def _peak_tracker(tracker_class):
    """`tracker_class` (FSDPMemTracker or MemTracker) keeping only the run's peak. The trackers also
    keep a peak per module, updated on every operation for every module seen, and track device
    queries that allocate nothing: at 7B both are a large part of the trace's time, and the memory
    report needs neither."""
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class PeakTracker(tracker_class):
        def _update_peak_stats(self, peak_state):
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot[_TOTAL_KEY]:
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.prim.device.default:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return PeakTracker


def _allreduce_in_place(state, bucket):
    """DDP's all-reduce of a gradient bucket as the fake group does it: in place, at once. (DDP's
    own hook hands on the future of the group's all-reduce, whose value the fake group leaves
    empty.)"""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training code the trace runs: train.py passes its own functions."""

    build_model: Callable  # (cfg, rt, dtype, sharded, pretrained) -> model
    make_optimizer: Callable  # (cfg, model, device) -> optimizer
    replicate_model: Callable  # (model, rt, sharded, compile) -> what the step calls
    train_step: (
        Callable  # (model, optimizer, micro_batches, grad_clip, autocast, stop) -> (loss, norm)
    )


def traced_steps(cfg: TrainConfig, rt, recipe: Recipe, micro_steps: int = 2) -> dict:
    """Build the model as the recipe does and run two of its training steps under the memory
    tracker, on the tensors the caller's mode makes (fake in trace_memory, real in the tests) and
    the process group it set up; return the peak bytes of this rank by category.

    The first step (one micro-step) creates the AdamW moments; the second, of `micro_steps`
    micro-steps (the config's accumulation if fewer), reaches the steady state: the moments, the
    gradients accumulated so far and one micro-step's activations at once.
    """
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    # The eager step (compiled kernels differ, and take minutes). Weights loaded with init_from
    # take the memory of initialised ones (their values cannot be read into fake tensors).
    cfg = dataclasses.replace(cfg, compile=False, init_from="")
    plan = plan_batch(cfg, rt.world_size)
    micro_steps = min(micro_steps, plan.accum_steps)
    sharded = cfg.parallel == "fsdp" and rt.distributed
    dtype, _ = compute_dtype(cfg, torch.device("cuda"))  # the GPU run's, on any machine
    with _peak_tracker(MemTracker)() as init_tracker:
        model = recipe.build_model(cfg, rt, dtype, sharded, False)
    init_peak = init_tracker.get_tracker_snapshot("peak")[rt.device]["Total"]
    optimizer = recipe.make_optimizer(cfg, model, rt.device)
    if sharded:
        tracker = _peak_tracker(FSDPMemTracker)(model, optimizer)
    else:
        tracker = _peak_tracker(MemTracker)()
        tracker.track_external(model, optimizer)
    shape = (plan.micro_batch_size, cfg.model.max_seq_len)
    autocast = distributed_autocast(rt.device, dtype, sharded)
    vote = StopVote(rt)  # the run's vote before each micro-step, a collective of its own
    with tracker:
        # The first step runs the model unwrapped, as on one rank: on fake tensors DDP takes one
        # step but not two (after its first it re-buckets the gradients, writing the new layout
        # into a host tensor that fake mode leaves without data). Its peak is below the second's.
        recipe.train_step(
            model,
            optimizer,
            _ZeroBatches(tracker, 1, shape, rt.device),
            cfg.grad_clip,
            autocast,
            vote.agreed,
        )
        forward = recipe.replicate_model(model, rt, sharded, False)  # DDP's buckets are made here
        if forward is not model and dist.get_backend() == "fake":
            forward.register_comm_hook(None, _allreduce_in_place)
        batches = _ZeroBatches(tracker, micro_steps, shape, rt.device)
        recipe.train_step(forward, optimizer, batches, cfg.grad_clip, autocast, vote.agreed)
    at_peak = _sizes(tracker.get_tracker_snapshot("peak")[rt.device])
    return {
        "peak": at_peak.pop("Total"),
        "at peak": at_peak,
        "peak at initialisation": init_peak,
        "between micro-steps": batches.between_micro_steps,
        "micro_steps": micro_steps,
    }


class _HostReadsSeeZero(torch.utils._python_dispatch.TorchDispatchMode):
    """A fake tensor has no values, so reading one on the host (.item(), .tolist()) reads 0: the
    stop vote is "no", the loss and gradient norm are finite, and the step applies its update."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import DataDependentOutputException

        try:
            return func(*args, **(kwargs or {}))
        except DataDependentOutputException:
            if func is not torch.ops.aten._local_scalar_dense.default:
                raise
            return 0.0 if args[0].is_floating_point() else 0


@contextlib.contextmanager
def _fake_tensors():
    """FakeTensorMode, with three adjustments that make torch 2.13 do under fake tensors what it
    does on real ones, and host reads of fake values answered (see _HostReadsSeeZero)."""
    import torch.distributed.tensor._sharding_prop as sharding_prop
    import torch.nn.parallel.distributed as ddp_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = sharding_prop.detect_fake_mode, ddp_module._verify_param_shape_across_processes
    fake_mode = FakeTensorMode()
    # Fake mode remembers some new tensors by a weak reference, and a tensor with one cannot be
    # swapped, which is how to_empty() replaces a fake parameter: the memo only serves converting
    # the same real tensor twice, which a fresh output never needs.
    fake_mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None
    # DTensor works out global output shapes in a fake mode of its own, which in a real run the
    # trackers never see; here it would reuse ours, and clipping's norm over every gradient would
    # count each gradient at its global size (25 GiB for 7B).
    sharding_prop.detect_fake_mode = lambda *args: None
    # DDP compares parameter shapes across ranks by reading their bytes; fake ranks have none to
    # compare.
    ddp_module._verify_param_shape_across_processes = lambda *args, **kwargs: None
    try:
        with fake_mode, _HostReadsSeeZero():
            yield
    finally:
        sharding_prop.detect_fake_mode, ddp_module._verify_param_shape_across_processes = saved


def trace_memory(cfg: TrainConfig, world_size: int, recipe: Recipe, micro_steps: int = 2) -> dict:
    """traced_steps on fake tensors, as rank 0 of a fake process group of `world_size` ranks (this
    process must have no process group of its own). Adds "seconds" to its result."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError(
            "the memory trace sets up a fake process group: run it in a process without one"
        )
    start = time.time()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        rt = Runtime(0, 0, world_size, torch.device("cpu"))
        if cfg.parallel == "fsdp":
            rt.mesh  # noqa: B018 -- the mesh reads the rank layout: built before the fake tensors
        with _fake_tensors():
            result = traced_steps(cfg, rt, recipe, micro_steps)
    finally:
        dist.destroy_process_group()
    return {**result, "seconds": time.time() - start}


# --------------------------------------------------------------------------- reports and the check


def memory_needed(cfg: TrainConfig, world_size: int) -> int:
    """Bytes a GPU needs for the run by the formula: the larger of the step's and the
    initialisation's peak, plus CUDA_RESERVE. (`--dry-run --trace` checks it against the trace.)"""
    estimate = estimate_memory(cfg, world_size)
    return int(max(estimate["total"], estimate["peak at initialisation"]) + CUDA_RESERVE)


# The share of a GPU's memory a run plans to fill: the caching allocator's fragmentation and the
# streams FSDP2 all-gathers on reserve more than the tensors alive at the peak.
PLANNED_SHARE = 0.9
GPUS = {"H100 80GB": 80 * 10**9, "H200 141GB": 141 * 10**9}  # what --dry-run fits micro-batches to


def fit_micro_batch(cfg: TrainConfig, world_size: int, device_bytes: int) -> int:
    """The largest micro-batch whose estimated need (memory_needed) fits PLANNED_SHARE of a device
    of `device_bytes`, among those that divide each rank's share of the global batch: the global
    batch, and so the recipe's math, stays the same. 1 when none fits (check_memory_fits says
    so)."""
    per_rank = plan_batch(dataclasses.replace(cfg, micro_batch_size=1), world_size).accum_steps
    for micro in (m for m in range(per_rank, 0, -1) if per_rank % m == 0):
        need = memory_needed(dataclasses.replace(cfg, micro_batch_size=micro), world_size)
        if need <= PLANNED_SHARE * device_bytes:
            return micro
    return 1


def check_memory_fits(cfg: TrainConfig, rt):
    """Before a CUDA run: rank 0 says the memory a GPU needs; every rank stops, saying what to
    change, when its GPU has less."""
    if rt.device.type != "cuda":
        return
    need = memory_needed(cfg, rt.world_size)
    have = torch.cuda.get_device_properties(rt.device).total_memory
    if rt.is_main:
        print(
            f"memory per GPU: {need / GiB:.1f} GiB needed (formula), {have / GiB:.1f} GiB on "
            "the GPU",
            flush=True,
        )
    if need > have:  # each rank says it: GPUs of one job may differ
        raise RankError(
            f"a GPU needs {need / GiB:.0f} GiB but has {have / GiB:.0f} GiB; use "
            "--parallel=fsdp with more GPUs, a smaller --micro_batch_size, or "
            "--activation_checkpointing=true (python train.py CONFIG --dry-run --trace shows the "
            f"breakdown); rank {rt.rank} on {socket.gethostname()}"
        )


def _print_sizes(sizes: dict, unit: tuple[str, int], formula: dict | None = None):
    """One line per category; beside each that the formula also has, the formula's figure."""
    name_of_unit, bytes_per_unit = unit
    for name, size in sizes.items():
        if round(size / bytes_per_unit, 2) == 0:
            continue
        line = f"  {name:<30} {size / bytes_per_unit:8.2f} {name_of_unit}"
        if formula and name in formula:
            difference = 100 * (formula[name] / size - 1)
            size_there = f"{formula[name] / bytes_per_unit:.2f} {name_of_unit}"
            line += f"   (formula {size_there}, {difference:+.0f}%)"
        print(line)


def dry_run(cfg: TrainConfig, world_size: int, recipe: Recipe | None = None):
    """Print the model's size, FLOPs, batch split and memory per GPU; given the recipe, also the
    peaks of its training step traced on fake tensors."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    n_params = model.num_params()
    print(
        f"parameters: {n_params:,} ({n_params / 1e9:.2f}B; "
        f"{model.num_params(exclude_embedding=True):,} without the embedding table)"
    )
    print(
        f"training FLOPs per token: {model.flops_per_token():,} (context {cfg.model.max_seq_len})"
    )
    if cfg.micro_batch_size == 0:
        fitted = {gpu: fit_micro_batch(cfg, world_size, size) for gpu, size in GPUS.items()}
        print(
            "micro_batch_size=0 fits the GPU: "
            + ", ".join(f"{micro} on an {gpu}" for gpu, micro in fitted.items())
            + f"; below, the {next(iter(GPUS))}'s"
        )
        cfg = dataclasses.replace(cfg, micro_batch_size=next(iter(fitted.values())))
    plan = plan_batch(cfg, world_size)
    print(
        f"world size {world_size}, parallel={cfg.parallel}, micro-batch "
        f"{plan.micro_batch_size} x {cfg.model.max_seq_len} tokens, {plan.accum_steps} "
        f"accumulation steps, {plan.global_batch_tokens:,} tokens per step"
        + (f" ({plan.note})" if plan.note else "")
    )
    estimate = estimate_memory(cfg, world_size)
    need = max(estimate["total"], estimate["peak at initialisation"])
    unit = ("GiB", GiB) if need >= GiB else ("MiB", 2**20)
    checkpointing = "on" if cfg.activation_checkpointing else "off"
    print(f"estimated memory per GPU (activation checkpointing {checkpointing}):")
    _print_sizes(estimate, unit)
    if recipe is not None:
        traced = trace_memory(cfg, world_size, recipe)
        repeats = (
            f"; the run's {plan.accum_steps} repeat the second"
            if traced["micro_steps"] < plan.accum_steps
            else ""
        )
        print(
            f"traced on fake tensors, {world_size} fake rank(s), {traced['seconds']:.0f} s (a "
            f"step of 1 micro-step, then one of {traced['micro_steps']}{repeats}), peak per GPU:"
        )
        _print_sizes(traced["at peak"], unit)
        # init_from's initialisation (reading each rank's shards) is not traced: the formula's
        init = {} if cfg.init_from else {"peak at initialisation": traced["peak at initialisation"]}
        _print_sizes({"total": traced["peak"], **init}, unit, estimate)
        need = max(
            traced["peak"], init.get("peak at initialisation", estimate["peak at initialisation"])
        )
    print(
        f"not counted: the CUDA context, cuBLAS and NCCL buffers, about "
        f"{CUDA_RESERVE / GiB:.0f} GiB; a GPU needs {(need + CUDA_RESERVE) / GiB:.1f} GiB "
        f"({'traced' if recipe else 'formula'})"
    )
