"""Where a run executes and how its ranks work together: the rank in the torchrun job, the device,
the dtype it computes in, the peak FLOP/s of its GPU (for MFU), the model sharded with FSDP2 or
replicated with DDP, and the stop vote that turns a signal on any rank into a clean stop on all.
train.py sets this up first; memory.py builds the same on fake ranks."""

import contextlib
import dataclasses
import datetime
import functools
import os
import re
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from config import ConfigError, TrainConfig
from tokenizer import UserError

# Dense (no sparsity) bf16 tensor-core peak per GPU from NVIDIA's datasheets, matched on the exact
# variant: an H100 PCIe scored against the SXM part's 989 TFLOP/s would read 30% low.
PEAK_BF16_FLOPS = [
    (r"H100.*PCIe", 756e12),
    (r"H[12]00 NVL", 835e12),
    (r"\bG?H[12]00\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
]
# Host-side agreement (the data is ready, a rank was signalled) waits on a gloo group with this
# timeout, not on NCCL's 10 minutes: rank 0 may spend hours preparing a corpus while the others
# wait.
HOST_WAIT = datetime.timedelta(hours=24)


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name, or None for a device not in the table."""
    return next(
        (flops for pattern, flops in PEAK_BF16_FLOPS if re.search(pattern, device_name)), None
    )


class RankError(UserError):
    """A problem of one rank alone (its GPU, its view of the files): each rank reports its own."""


@dataclasses.dataclass
class Runtime:
    """Where this process runs: its rank in the job, its device, and the gloo group for host-side
    waits."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    host_group: object = None

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1 or dist.is_initialized()

    @functools.cached_property
    def mesh(self):
        """The device mesh FSDP shards over, of the run's own device type: left to itself FSDP picks
        the machine's accelerator, and would move a --device=cpu model onto a GPU that the gloo
        group cannot talk to. Built once, outside any fake-tensor tracing (memory.py): it reads the
        rank layout."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,))

    def barrier(self):
        if self.distributed:
            dist.barrier(self.host_group)

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a picklable Python object, sent over the host group)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.host_group)
        return box[0]


def setup_runtime(cfg: TrainConfig) -> Runtime:
    """Join the torchrun job if there is one: nccl on CUDA, gloo on CPU, one device per local rank,
    and a gloo group for the host-side waits."""
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device} but CUDA is not available; use --device=cpu")
    if use_cuda:
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise RankError(
                f"rank {rank} (local rank {local_rank}) on {socket.gethostname()} has no "
                f"GPU: this node has {gpus}; use --nproc_per_node={gpus} or less"
            )
        device = torch.device(
            cfg.device if ":" in cfg.device and world_size == 1 else f"cuda:{local_rank}"
        )
        # FSDP2 all-gathers on streams of its own: segments that grow in place keep the memory
        # they reserve close to what is allocated.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    host_group = None
    if "RANK" in os.environ:
        check_gloo_address(world_size)
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", device_id=device if use_cuda else None
        )
        host_group = dist.new_group(backend="gloo", timeout=HOST_WAIT)
    elif cfg.parallel == "fsdp":
        raise ConfigError(
            "parallel=fsdp needs torchrun (e.g. torchrun --standalone "
            "--nproc_per_node=1 train.py ...)"
        )
    return Runtime(rank, local_rank, world_size, device, host_group)


def check_gloo_address(world_size: int):
    """The host group (gloo) binds to the address this host's name resolves to. On several nodes
    a name that resolves to loopback (common in containers) makes it fail with "Gloo
    connectFullMesh failed": say which variable to set instead."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local >= world_size or os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return
    if address.startswith("127.") or address == "::1":
        raise RankError(
            f"{socket.gethostname()} resolves to {address}, a loopback address, so the "
            "ranks of other nodes cannot reach this one's gloo group: set "
            "GLOO_SOCKET_IFNAME to the network interface the nodes share (e.g. "
            "GLOO_SOCKET_IFNAME=eth0; `ip -brief address` lists them)"
        )


def shard_model(model, rt: Runtime, dtype: torch.dtype):
    """FSDP2 as torchtitan applies it: `fully_shard` each block (one all-gather per block,
    overlapped with the previous block's compute), then the root (embedding, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Blocks receive the hidden state (already bf16) and the fp32 RoPE tables: casting the inputs
    # would rotate in bf16 under FSDP but in fp32 under DDP's autocast.
    block_policy = MixedPrecisionPolicy(
        param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    for block in model.layers:
        fully_shard(block, mesh=rt.mesh, mp_policy=block_policy)
    root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    fully_shard(model, mesh=rt.mesh, mp_policy=root_policy)


def replicate_model(model, rt: Runtime, sharded: bool, compile: bool):
    """DDP around the model when the ranks replicate it (FSDP shards it in shard_model), then
    torch.compile per block if asked; returns what the training step calls."""
    ddp = model
    if rt.world_size > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        # RoPE buffers are derived from the config, never changed: broadcasting them every forward
        # is wasted traffic.
        device_ids = [rt.device] if rt.device.type == "cuda" else None
        ddp = DistributedDataParallel(
            model, device_ids=device_ids, forward_sync_buffers=False, gradient_as_bucket_view=True
        )
    if compile:
        # Regional compilation: the blocks share their code, so one graph serves them all and
        # compile time does not grow with depth. In place: parameter names are unchanged.
        for block in model.layers:
            block.compile()
    return ddp


class StopVote:
    """A signal on any rank becomes a stop on every rank. SIGTERM and SIGINT (torchrun, Ctrl-C),
    SIGUSR1 (SLURM's `--signal=USR1@SECONDS` warning) and SIGHUP (a closed terminal; torchrun
    forwards it) only set a flag; `agreed()` votes over the gloo host group, so the GPU never waits
    for it and every rank stops after the same micro-step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)

    def __init__(self, rt: Runtime):
        self.rt, self.signal, self.saved = rt, None, {}

    def __enter__(self):
        self.saved = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signal = signum

    def agreed(self) -> bool:
        if not self.rt.distributed:
            return self.signal is not None
        vote = torch.tensor([self.signal is not None], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.rt.host_group)
        return bool(vote.item())


def autocast(device: torch.device, dtype: torch.dtype, sharded: bool):
    """What the training step runs under: a context factory for bf16 autocast, or one that does
    nothing in float32 and under FSDP, whose policy already computes in bf16."""
    if dtype == torch.float32 or sharded:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def device_memory(device: torch.device) -> int:
    """Bytes of memory of the device: the GPU's, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def native_bf16_cpu() -> str | None:
    """The x86 feature that gives this CPU native bf16 matrix multiplies, or None.

    With AMX tiles or AVX512-BF16 dot products oneDNN multiplies bf16 matrices faster than fp32
    (bench/bench_model.py measures by how much); without them it emulates bf16, slower than fp32.
    Other CPUs (Arm included) are not measured here, so dtype=auto keeps them in fp32.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    for feature, supported in (
        ("AMX", "_is_amx_tile_supported"),
        ("AVX512-BF16", "_is_avx512_bf16_supported"),
    ):
        if getattr(torch.cpu, supported, lambda: False)():
            return feature
    return None


def compute_dtype(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype, and why (for the start line). dtype=auto: bf16 on CUDA and on CPUs with
    native bf16 matmuls, fp32 elsewhere. Weights, gradients and AdamW state stay fp32 either way."""
    if cfg.dtype == "float32" and device.type == "cuda":
        return (
            torch.float32,
            "float32 (dtype=float32: exact fp32 matmuls, no TF32; a slow reference)",
        )
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype), f"{cfg.dtype} (dtype={cfg.dtype})"
    if device.type == "cuda":
        return torch.bfloat16, "bf16 autocast (dtype=auto on CUDA)"
    feature = native_bf16_cpu()
    if feature:
        return torch.bfloat16, f"bf16 autocast (dtype=auto: this CPU has {feature})"
    return (
        torch.float32,
        "float32 (dtype=auto: this CPU has no native bf16 matmul, AMX or AVX512-BF16)",
    )


def check_shared_files(rt: Runtime, path: Path, what: str):
    """Every rank must see the files rank 0 writes (prepared data, checkpoints): on several nodes
    that takes a shared filesystem. A rank that cannot see rank 0's newest file stops with one
    line."""
    expected = rt.broadcast(path.read_text() if rt.is_main else None)
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    if seen != expected:
        raise RankError(
            f"rank {rt.rank} on {socket.gethostname()} cannot see the {what} rank 0 wrote at "
            f"{path}:"
            " runs on several nodes need out_dir and data_dir on a filesystem every node shares"
        )
