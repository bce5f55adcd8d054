"""Memory per GPU of a training run: a formula, and a trace of the real training step on fake tensors.

    python train.py config/7b.py --dry-run --world-size=8            # the formula, at once
    python train.py config/7b.py --dry-run --world-size=8 --trace    # and the traced step (seconds)

The trace runs train.py's own code: build_model (the full fp32 initialisation, then FSDP2 with its
bf16 policy), make_optimizer, the DDP wrapping and Trainer.train_step itself (micro-steps, activation
checkpointing, clipping, AdamW), on FakeTensorMode tensors (shapes, dtypes and devices, no data) with a
fake process group of any world size, and PyTorch's memory trackers (FSDPMemTracker under FSDP,
MemTracker otherwise) add up every tensor alive at each moment. It runs the CPU kernels: the CUDA
context, cuBLAS and NCCL buffers and the caching allocator's fragmentation are not traced, and a
fixed reserve stands for them. Before a CUDA run, check_memory_fits traces in a process of its own
when that takes less than TRACE_TIME_LIMIT_S, and falls back to the formula otherwise.
"""
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from config import ConfigError, TrainConfig, from_dict, plan_batch
from model import LOSS_CHUNK_ELEMENTS, Transformer
from infra.runtime import Runtime, compute_dtype

GiB = 2**30
CUDA_RESERVE = 2 * GiB  # the CUDA context (~0.5 GiB), cuBLAS workspaces and NCCL's buffers: never traced
TRACE_TIME_LIMIT_S = 120  # the pre-run check waits this long for the trace (7B: ~20 s), then takes the formula


# ----------------------------------------------------------------------------- the formula

def estimate_memory(cfg: TrainConfig, world_size: int) -> dict:
    """Bytes per GPU at the peak of a training step, by category; and the peak while building the model.

    Persistent: fp32 weights and gradients (FSDP reduce-scatters every micro-step, so both stay
    sharded) and two fp32 AdamW moments, 16 bytes per parameter, divided by the world size under FSDP.
    FSDP keeps the root group (embedding, head, final norm) gathered in bf16 all step, and one block
    gathered while it computes. DDP adds its fp32 gradient buckets when accumulating (the non-final
    micro-steps accumulate into gradients of their own; with one micro-step the gradients are views
    of the buckets).

    Activations, per token of a micro-batch: with checkpointing each block keeps only its input (the
    residual stream: bf16 under FSDP's policy, fp32 under autocast); without, a block keeps
    e(4 ffn + 2 dim + 2 kv_dim) bytes of matmul outputs in the compute dtype (e bytes each) plus
    (16 + 2e) dim for its two norms (fp32 input and normalised value, the output). The peak is the
    larger of two moments. In a block's backward: one block recomputed plus two ffn-wide gradients,
    the logits the step holds (e vocab), and under FSDP the next block's all-gather and this one's
    fp32 reduce-scatter buffer. In the loss's backward: the bf16 logits, the fp32 log-softmax output,
    its gradient and its input's gradient ((e + 12) vocab); autocast also still holds its bf16 copy
    of every weight (2 bytes per parameter), cached until the forward ends. A micro-batch of more
    tokens than one loss chunk (model.chunked_cross_entropy) keeps no logits through the step, and its
    loss's backward holds one chunk's, plus a second copy of the head's gradient while it accumulates.

    With init_from, FSDP allocates only each rank's shards and reads them from the files: no full model.
    """
    with torch.device("meta"):
        model = Transformer(cfg.model)
    m, n_params = cfg.model, model.num_params()
    plan = plan_batch(cfg, world_size)
    tokens = plan.micro_batch_size * m.max_seq_len
    sharded, autocast = cfg.parallel == "fsdp", cfg.parallel != "fsdp" and cfg.dtype != "float32"
    e = 4 if cfg.dtype == "float32" else 2  # bytes of the compute dtype on a GPU ("auto" is bf16 there)
    stream = e if sharded else 4
    ffn, kv_dim = m.hidden_dim, m.kv_heads * m.head_dim
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = n_params - m.n_layers * block
    shards = world_size if sharded else 1

    per_layer = e * (4 * ffn + 2 * m.dim + 2 * kv_dim) + (16 + 2 * e) * m.dim + (2 * m.dim if m.dropout else 0)
    kept = tokens * m.n_layers * (m.dim * stream if cfg.activation_checkpointing else per_layer)
    chunk_tokens = max(1, LOSS_CHUNK_ELEMENTS // m.vocab_size)
    chunked = tokens > chunk_tokens
    held_logits = 0 if chunked else e * tokens * m.vocab_size
    block_backward = (kept + tokens * ((per_layer if cfg.activation_checkpointing else 0) + 2 * e * ffn) + held_logits
                      + (e * block + 4 * block if sharded else 0))
    loss_backward = (kept + min(tokens, chunk_tokens) * m.vocab_size * (e + 12) + (2 * n_params if autocast else 0)
                     + (stream * m.vocab_size * m.dim if chunked else 0))
    estimate = {
        "weights (fp32)": 4 * n_params / shards,
        "gradients (fp32)": 4 * n_params / shards,
        "AdamW moments (fp32)": 8 * n_params / shards,
    }
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
    else:  # build_model initialises the whole model on every rank, then copies out each group's shard
        estimate["peak at initialisation"] = 4 * n_params + 4 * max(root, block) / shards
    return estimate


# ----------------------------------------------------------------------------- the trace

class _ZeroTokens:
    """Stands in for TokenData: every micro-batch is all token 0. Fetching one marks the start of a
    micro-step: the tracker starts a new iteration (it refuses to see a module run twice otherwise),
    and what is alive then, between two micro-steps, is recorded."""

    def __init__(self, tracker):
        self.tracker, self.between_micro_steps = tracker, None

    def train_starts(self, seed, step, count, seq_len):
        return np.zeros(count, dtype=np.int64)

    def batch(self, starts, seq_len, device):
        self.tracker.reset_mod_stats()
        self.between_micro_steps = _sizes(self.tracker.get_tracker_snapshot("current").get(device, {}))
        x = torch.zeros((len(starts), seq_len), dtype=torch.long, device=device)
        return x, torch.zeros_like(x)


def _sizes(snapshot: dict) -> dict:
    """A tracker's snapshot of one device as {category name: bytes}, leaving out empty ones."""
    return {getattr(name, "value", name): size for name, size in snapshot.items() if size}


def _peak_tracker(tracker_class):
    """`tracker_class` (FSDPMemTracker or MemTracker) keeping only the run's peak. The trackers also keep
    a peak per module, updated on every operation for every module seen: at 7B that bookkeeping, and
    tracking the device queries that allocate nothing, took a third of the trace's time."""
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
    """DDP's all-reduce of a gradient bucket as the fake group does it: in place, at once. (DDP's own
    hook hands on the future of the group's all-reduce, whose value the fake group leaves empty.)"""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def traced_steps(cfg: TrainConfig, rt, micro_steps: int = 2) -> dict:
    """Build the model as train.py does and run two Trainer.train_step calls under the memory tracker,
    on the tensors the caller's mode makes (fake in trace_memory, real in the tests) and the process
    group it set up; return the peak bytes of this rank by category.

    The first step (one micro-step) creates the AdamW moments; the second, of `micro_steps`
    micro-steps (the config's accumulation if fewer), reaches the steady state: the moments, the
    gradients accumulated so far and one micro-step's activations at once. Later micro-steps repeat it.
    """
    import torch.distributed as dist
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    import train  # train.py imports this module
    # The eager step (compiled kernels differ, and take minutes). Weights loaded with init_from take the
    # memory of initialised ones (their values cannot be read into fake tensors); only the way there
    # differs, and the formula gives that initialisation's peak.
    cfg = dataclasses.replace(cfg, compile=False, init_from="")
    plan = plan_batch(cfg, rt.world_size)
    micro_steps = min(micro_steps, plan.accum_steps)
    trainer = train.Trainer.__new__(train.Trainer)  # the step's state, without the run's files and data
    trainer.cfg, trainer.rt, trainer.step, trainer.stop_signal = cfg, rt, 0, None
    trainer.sharded = cfg.parallel == "fsdp" and rt.distributed
    trainer.dtype, _ = compute_dtype(cfg, torch.device("cuda"))  # the GPU run's, on any machine
    with _peak_tracker(MemTracker)() as init_tracker:
        trainer.model = train.build_model(cfg, rt, trainer.dtype, trainer.sharded)
    init_peak = init_tracker.get_tracker_snapshot("peak")[rt.device]["Total"]
    trainer.optimizer = train.make_optimizer(cfg, trainer.model, rt.device)
    if trainer.sharded:
        tracker = _peak_tracker(FSDPMemTracker)(trainer.model, trainer.optimizer)
    else:
        tracker = _peak_tracker(MemTracker)()
        tracker.track_external(trainer.model, trainer.optimizer)
    trainer.train_data = _ZeroTokens(tracker)
    with tracker:
        # The first step runs the model unwrapped, as on one rank: on fake tensors DDP takes one step
        # but not two (after its first it re-buckets the gradients, writing the new layout into a
        # host tensor that fake mode leaves without data). Its peak is below the second's either way.
        trainer.ddp, trainer.forward = None, trainer.model
        trainer.plan = dataclasses.replace(plan, accum_steps=1)
        trainer.train_step()
        trainer.step += 1
        trainer._wrap_model()  # DDP's gradient buckets are allocated here
        if trainer.ddp is not None and dist.get_backend() == "fake":
            trainer.ddp.register_comm_hook(None, _allreduce_in_place)
        trainer.plan = dataclasses.replace(plan, accum_steps=micro_steps)
        trainer.train_step()
    at_peak = _sizes(tracker.get_tracker_snapshot("peak")[rt.device])
    return {"peak": at_peak.pop("Total"), "at peak": at_peak, "peak at initialisation": init_peak,
            "between micro-steps": trainer.train_data.between_micro_steps, "micro_steps": micro_steps}


class _HostReadsSeeZero(torch.utils._python_dispatch.TorchDispatchMode):
    """A fake tensor has no values, so reading one on the host (.item(), .tolist()) reads 0: the stop
    vote is "no", the loss and gradient norm are finite, and the step applies its update."""

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
    """FakeTensorMode, with three adjustments that make torch 2.13 do under fake tensors what it does on
    real ones, and host reads of fake values answered (see _HostReadsSeeZero)."""
    import torch.distributed.tensor._sharding_prop as sharding_prop
    import torch.nn.parallel.distributed as ddp_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = sharding_prop.detect_fake_mode, ddp_module._verify_param_shape_across_processes
    fake_mode = FakeTensorMode()
    # Fake mode remembers some new tensors by a weak reference, and a tensor with one cannot be
    # swapped, which is how to_empty() replaces a fake parameter: the memo only serves converting the
    # same real tensor twice, which a fresh output never needs.
    fake_mode.fake_tensor_converter.set_tensor_memo = lambda tensor, fake: None
    # DTensor works out global output shapes in a fake mode of its own, which in a real run the trackers
    # never see; here it would reuse ours, and clipping's norm over every gradient would count each
    # gradient at its global size (25 GiB for 7B).
    sharding_prop.detect_fake_mode = lambda *args: None
    # DDP compares parameter shapes across ranks by reading their bytes; fake ranks have none to compare.
    ddp_module._verify_param_shape_across_processes = lambda *args, **kwargs: None
    try:
        with fake_mode, _HostReadsSeeZero():
            yield
    finally:
        sharding_prop.detect_fake_mode, ddp_module._verify_param_shape_across_processes = saved


def trace_memory(cfg: TrainConfig, world_size: int, micro_steps: int = 2) -> dict:
    """traced_steps on fake tensors, as rank 0 of a fake process group of `world_size` ranks (this
    process must have no process group of its own). Adds "seconds" to its result."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the memory trace sets up a fake process group: run it in a process without one")
    start = time.time()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        rt = Runtime(0, 0, world_size, torch.device("cpu"))
        if cfg.parallel == "fsdp":
            rt.mesh  # noqa: B018 -- the mesh reads the rank layout, so it is built before the fake tensors
        with _fake_tensors():
            result = traced_steps(cfg, rt, micro_steps)
    finally:
        dist.destroy_process_group()
    return {**result, "seconds": time.time() - start}


def trace_in_subprocess(cfg: TrainConfig, world_size: int, time_limit: float) -> dict:
    """trace_memory in a process of its own (a run's process already has its process group), without
    access to the GPUs; subprocess.TimeoutExpired after `time_limit` seconds, RuntimeError if it fails."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "infra.memory", str(world_size)], env=env | {"CUDA_VISIBLE_DEVICES": ""},
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            input=json.dumps(dataclasses.asdict(cfg)), capture_output=True, text=True, timeout=time_limit)
    if result.returncode != 0:
        raise RuntimeError((result.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(result.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------- reports and the check

def memory_needed(cfg: TrainConfig, world_size: int, time_limit: float = TRACE_TIME_LIMIT_S) -> tuple[int, str]:
    """Bytes a GPU needs for the run (the larger of the step's and the initialisation's peak, plus
    CUDA_RESERVE), traced when the trace takes under `time_limit` seconds, else by the formula; and
    which of the two it is."""
    try:
        traced = trace_in_subprocess(cfg, world_size, time_limit)
        init = estimate_memory(cfg, world_size)["peak at initialisation"] if cfg.init_from else traced["peak at initialisation"]
        peak, how = max(traced["peak"], init), f"traced in {traced['seconds']:.0f} s"
    except (subprocess.TimeoutExpired, RuntimeError) as why:
        estimate = estimate_memory(cfg, world_size)
        reason = f"the trace took over {time_limit:g} s" if isinstance(why, subprocess.TimeoutExpired) \
            else f"the trace failed: {why}"
        peak, how = max(estimate["total"], estimate["peak at initialisation"]), f"formula; {reason}"
    return int(peak + CUDA_RESERVE), how


def check_memory_fits(cfg: TrainConfig, rt):
    """Before a CUDA run: rank 0 works out the memory a GPU needs (memory_needed) and says it; every
    rank stops, saying what to change, when its GPU has less."""
    if rt.device.type != "cuda":
        return
    need, how = rt.broadcast(memory_needed(cfg, rt.world_size) if rt.is_main else None)
    have = torch.cuda.get_device_properties(rt.device).total_memory
    if rt.is_main:
        print(f"memory per GPU: {need / GiB:.1f} GiB needed ({how}), {have / GiB:.1f} GiB on the GPU", flush=True)
    if need > have:
        raise ConfigError(
            f"a GPU needs {need / GiB:.0f} GiB ({how}) but has {have / GiB:.0f} GiB; use --parallel=fsdp with "
            "more GPUs, a smaller --micro_batch_size, or --activation_checkpointing=true"
            " (python train.py CONFIG --dry-run --trace shows the breakdown)")


def _print_sizes(sizes: dict, unit: tuple[str, int], formula: dict | None = None):
    """One line per category; beside each that the formula also has, the formula's figure."""
    name_of_unit, bytes_per_unit = unit
    for name, size in sizes.items():
        if round(size / bytes_per_unit, 2) == 0:
            continue
        line = f"  {name:<30} {size / bytes_per_unit:8.2f} {name_of_unit}"
        if formula and name in formula:
            line += f"   (formula {formula[name] / bytes_per_unit:.2f} {name_of_unit}, {100 * (formula[name] / size - 1):+.0f}%)"
        print(line)


def dry_run(cfg: TrainConfig, world_size: int, trace: bool = False):
    """Print the model's size, FLOPs, batch split and memory per GPU; with `trace`, also the traced peaks."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    n_params = model.num_params()
    print(f"parameters: {n_params:,} ({n_params / 1e9:.2f}B; {model.num_params(exclude_embedding=True):,}"
          " without the embedding table)")
    print(f"training FLOPs per token: {model.flops_per_token():,} (context {cfg.model.max_seq_len})")
    plan = plan_batch(cfg, world_size)
    print(f"world size {world_size}, parallel={cfg.parallel if world_size > 1 else 'none'}, micro-batch "
          f"{plan.micro_batch_size} x {cfg.model.max_seq_len} tokens, {plan.accum_steps} accumulation steps, "
          f"{plan.global_batch_tokens:,} tokens per step" + (f" ({plan.note})" if plan.note else ""))
    estimate = estimate_memory(cfg, world_size)
    need = max(estimate["total"], estimate["peak at initialisation"])
    unit = ("GiB", GiB) if need >= GiB else ("MiB", 2**20)
    print(f"estimated memory per GPU (activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}):")
    _print_sizes(estimate, unit)
    if trace:
        traced = trace_memory(cfg, world_size)
        repeats = f"; the run's {plan.accum_steps} repeat the second" if traced["micro_steps"] < plan.accum_steps else ""
        print(f"traced on fake tensors, {world_size} fake rank(s), {traced['seconds']:.0f} s (a step of 1 micro-step, "
              f"then one of {traced['micro_steps']}{repeats}), peak per GPU:")
        _print_sizes(traced["at peak"], unit)
        # init_from's initialisation (reading each rank's shards) is not traced: the formula's figure stands
        init = {} if cfg.init_from else {"peak at initialisation": traced["peak at initialisation"]}
        _print_sizes({"total": traced["peak"], **init}, unit, estimate)
        need = max(traced["peak"], init.get("peak at initialisation", estimate["peak at initialisation"]))
    print(f"not counted: the CUDA context, cuBLAS and NCCL buffers, about {CUDA_RESERVE / GiB:.0f} GiB; a GPU needs "
          f"{(need + CUDA_RESERVE) / GiB:.1f} GiB ({'traced' if trace else 'formula'})")


if __name__ == "__main__":  # trace_in_subprocess: python -m infra.memory WORLD_SIZE < config.json
    print(json.dumps(trace_memory(from_dict(json.load(sys.stdin)), int(sys.argv[1]))))
