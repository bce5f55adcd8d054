"""Hugging Face interop: Llama-family model folders, in both directions.

Models. A Hugging Face model folder is config.json plus weights: one model.safetensors, shards
model-0000N-of-0000M.safetensors listed in model.safetensors.index.json, or pytorch_model.bin
(also sharded with pytorch_model.bin.index.json; read with weights_only=True). `read_config` maps
config.json to a ModelConfig for LlamaForCausalLM (Llama 2, Llama 3.x with rope_type "llama3",
TinyLlama, SmolLM) and MistralForCausalLM, and refuses, with one line, every setting that would
make the model compute something model.py does not (biases, another activation or RoPE scaling, a
head_dim other than dim / n_heads, quantized weights); Mistral's sliding window becomes the context.
model.py uses Hugging Face's rotate-half RoPE layout, and its parameters map one to one onto
Hugging Face's names, so import and export rename tensors and never permute them.

Weights are read lazily, tensor by tensor (safetensors slices; torch.load(mmap=True) for .bin).
`load_weights` copies them into a model already allocated on its device, possibly sharded by
FSDP2: each rank reads only the rows of its own shards, so importing a 7B model under torchrun
never holds a full copy of the weights per rank in host memory. It also reads run folders of this
project (its newest ckpt-N.pt, or an FSDP run's ckpt-N/), which is what `train.py --init_from=PATH` needs.
`export` writes a complete folder that transformers' from_pretrained, AutoTokenizer and
pipeline("text-generation") load.

Tokenizer files (tokenizer.json, tiktoken's) are tokenizer_formats.py's.
"""
import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from infra import atomic
from infra import checkpoint
from model import ModelConfig, Transformer
from infra.tokenizer_formats import write_tokenizer

CONFIG_FILE = "config.json"
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # model_type -> architecture
MAX_SHARD_BYTES = 5 * 2**30  # export: transformers' default shard size


class HFError(ValueError):
    """A model folder that cannot be imported or exported; the message (one line) says why."""


def _first_line(error) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


# --- models

# Our parameter names (Meta's Llama code) -> Hugging Face's.
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
          "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def hf_name(name: str) -> str:
    """Hugging Face's name for one of our parameters: layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight."""
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, i, sub = module.split(".", 2)
        return f"model.layers.{i}.{_LAYER[sub]}.{param}"
    return f"{_TOP[module]}.{param}"


def read_config(folder) -> ModelConfig:
    """The ModelConfig of a Hugging Face Llama or Mistral folder, from its config.json.

    Every key that LlamaForCausalLM / MistralForCausalLM reads is either mapped or checked; a key
    the file leaves out takes transformers' default. Mistral's sliding window equals full causal
    attention over contexts up to its size, so the context becomes min(max_position_embeddings,
    sliding_window). pretraining_tp only splits matmuls (same math), the dtype is converted on
    load, and token ids concern the tokenizer.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise HFError(f"{folder} has no {CONFIG_FILE}: not a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HFError(f"cannot read {path}: {_first_line(e)}") from None
    if not isinstance(hf, dict):
        raise HFError(f"{path} is not a JSON object")

    def refuse(what, why="model.py does not compute it"):
        raise HFError(f"{path}: {what} is not supported ({why})")

    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    if model_type not in SUPPORTED or architectures not in ([], [SUPPORTED[model_type]]):
        refuse(f"architecture {'/'.join(map(str, architectures)) or model_type!r}",
               f"this imports {' and '.join(SUPPORTED.values())}")

    def number(key, default=None, kind=(int, float), rope_dict=None):
        source = hf if rope_dict is None else rope_dict
        value = source.get(key, default)
        if type(value) not in (kind if isinstance(kind, tuple) else (kind,)) or not 0 < value < math.inf:
            raise HFError(f"{path}: {key} must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
        return value

    for key, wrong, what in (("hidden_act", lambda v: v != "silu", "hidden_act {} (only silu)"),
                             ("attention_bias", bool, "attention_bias {} (biases)"),
                             ("mlp_bias", bool, "mlp_bias {} (biases)"),
                             ("attention_dropout", bool, "attention_dropout {} (dropout is --model.dropout here)"),
                             ("quantization_config", lambda v: v is not None, "quantization_config {} (quantized weights)")):
        if key in hf and wrong(hf[key]):
            refuse(what.format(json.dumps(hf[key])))

    dim, n_heads = number("hidden_size", kind=int), number("num_attention_heads", kind=int)
    if hf.get("head_dim") is not None and hf["head_dim"] * n_heads != dim:
        refuse(f"head_dim {hf['head_dim']} (not hidden_size / num_attention_heads = {dim / n_heads:g})")
    n_kv_heads = number("num_key_value_heads", kind=int) if hf.get("num_key_value_heads") is not None else n_heads
    context = number("max_position_embeddings", 2048 if model_type == "llama" else 131072, kind=int)
    if model_type == "mistral" and hf.get("sliding_window", 4096) is not None:
        context = min(context, number("sliding_window", 4096, kind=int))

    # RoPE: transformers 5 writes rope_parameters (with rope_theta inside), older versions rope_theta + rope_scaling.
    if hf.get("rope_parameters") and hf.get("rope_scaling"):
        raise HFError(f"{path} has both rope_parameters and rope_scaling; keep the one that is meant")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise HFError(f"{path}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor (RoPE on part of each head)")
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(rope_scale_factor=float(number("factor", rope_dict=rope)),
                       rope_low_freq_factor=float(number("low_freq_factor", rope_dict=rope)),
                       rope_high_freq_factor=float(number("high_freq_factor", rope_dict=rope)),
                       rope_original_max_seq_len=number("original_max_position_embeddings", context, int, rope))
    elif rope_type != "default":
        refuse(f"RoPE scaling {rope_type!r} (only Llama 3.1's 'llama3')")
    theta = number("rope_theta", hf.get("rope_theta", 10000.0), rope_dict=rope)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise HFError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}")
    try:
        return ModelConfig(vocab_size=number("vocab_size", kind=int), dim=dim, n_layers=number("num_hidden_layers", kind=int),
                           n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_hidden=number("intermediate_size", kind=int),
                           max_seq_len=context, norm="rmsnorm", norm_eps=float(number("rms_norm_eps", 1e-6)),
                           rope_theta=float(theta), tie_embeddings=tie, dropout=0.0, **scaling)
    except ValueError as e:
        raise HFError(f"{path}: {_first_line(e)}") from None


def hf_config(config: ModelConfig, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json of a LlamaForCausalLM equal to `config`, in the form transformers 4 and 5 both read."""
    if config.norm != "rmsnorm":
        raise HFError(f"this model uses norm={config.norm!r}; Hugging Face Llama only has RMSNorm, so it cannot be exported")
    rope_scaling = None
    if config.rope_scaling is not None:
        factor, low, high, original = config.rope_scaling
        rope_scaling = dict(rope_type="llama3", factor=factor, low_freq_factor=low, high_freq_factor=high,
                            original_max_position_embeddings=original)
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=config.vocab_size,
                hidden_size=config.dim, intermediate_size=config.hidden_dim, num_hidden_layers=config.n_layers,
                num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
                max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
                rope_scaling=rope_scaling, tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
                attention_bias=False, attention_dropout=0.0, mlp_bias=False, torch_dtype="float32",
                bos_token_id=bos_id, eos_token_id=eos_id)


class _SafetensorsTensor:
    """A tensor in a safetensors file, read from disk only when (and as far as) it is indexed."""

    def __init__(self, handle, name):
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())
        self.dtype = self._slice.get_dtype()  # "BF16", "F32", "I8", ...

    def is_floating_point(self):
        return self.dtype in ("F64", "F32", "F16", "BF16")

    def __getitem__(self, index):
        return self._slice[index]


def _open_file(path: Path, kind: str) -> dict:
    """Tensor name -> lazily read tensor for one safetensors or PyTorch weights file."""
    if not path.is_file():
        raise HFError(f"{path} is missing (the index of {path.parent} lists it)")
    if kind == "safetensors":
        try:
            from safetensors import safe_open
        except ImportError:
            raise HFError(f"reading {path} needs the safetensors package: pip install safetensors") from None
        try:
            handle = safe_open(str(path), framework="pt")
            return {name: _SafetensorsTensor(handle, name) for name in handle.keys()}
        except Exception as e:  # safetensors raises its own error type, or OSError
            raise HFError(f"{path} is truncated or not a safetensors file ({_first_line(e)})") from None
    try:  # mmap: tensors are paged in when read, so a 15 GB file costs nothing until then
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise HFError(f"{path} is truncated or not a PyTorch weights file ({_first_line(e)})") from None
    if not (isinstance(state, dict) and all(isinstance(t, torch.Tensor) for t in state.values())):
        raise HFError(f"{path} does not hold a dictionary of tensors")
    return state


def _hf_tensors(folder: Path) -> dict:
    """Hugging Face tensor name -> lazily read tensor, over all weight files of the folder."""
    for single, kind in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        index = folder / f"{single}.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFError(f"{index} is corrupt (no readable weight_map: {_first_line(e)})") from None
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        tensors = {}
        for name in files:
            tensors.update(_open_file(folder / name, kind))
        return tensors
    raise HFError(f"{folder} has no weights: expected model.safetensors, model-0000N-of-0000M.safetensors with "
                  "model.safetensors.index.json, or pytorch_model.bin")


def _match(tensors: dict, shapes: dict, file_name, ignore, where) -> dict:
    """Our name -> lazy tensor for every name in `shapes`, checking that the file holds exactly those
    (besides names `ignore` accepts) with the same shapes, in floating point."""
    wanted = {file_name(name): name for name in shapes}
    unexpected = [n for n in tensors if n not in wanted and not ignore(n)]
    if unexpected:
        hint = " (biases are not supported)" if unexpected[0].endswith(".bias") else ""
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise HFError(f"{where} holds {unexpected[0]}{more}, which this model does not have{hint}")
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise HFError(f"{where} lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    for file_key, name in wanted.items():
        tensor = tensors[file_key]
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise HFError(f"{where}: {file_key} has shape {list(tensor.shape)} but the model's config gives "
                          f"{list(shapes[name])}")
        if not tensor.is_floating_point():
            raise HFError(f"{where}: {file_key} is {tensor.dtype}, not floating point (quantized weights are not supported)")
    return {name: tensors[file_key] for file_key, name in wanted.items()}


def _run_checkpoint(folder: Path):
    """("file", ckpt-N.pt, state) or ("dcp", ckpt-N/, train state): a run folder's newest checkpoint."""
    found = [path for path in (checkpoint.latest(folder, sharded=False), checkpoint.latest(folder, sharded=True)) if path]
    if not found:
        raise HFError(f"{folder} holds no complete checkpoint (ckpt-N.pt or ckpt-N/)")
    newest = max(found, key=checkpoint.step_of)
    if newest.is_dir():
        return "dcp", newest, _load_run_file(newest / checkpoint.TRAIN_STATE_FILE)
    return "file", newest, _load_run_file(newest)


def _load_run_file(path: Path) -> dict:
    try:  # mmap: only what is used of a ckpt-N.pt (weights, not optimizer state) is ever read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise HFError(f"{path} is corrupt or not a checkpoint ({_first_line(e)})") from None
    if not (isinstance(state, dict) and state.get("version") == checkpoint.FORMAT_VERSION
            and isinstance(state.get("config"), dict) and isinstance(state["config"].get("model"), dict)):
        raise HFError(f"{path} is not a version-{checkpoint.FORMAT_VERSION} checkpoint of this project")
    return state


def _is_run_folder(path: Path) -> bool:
    return bool(checkpoint.list_checkpoints(path, sharded=False) or checkpoint.list_checkpoints(path, sharded=True))


def _kind(path: Path) -> str:
    if (path / CONFIG_FILE).is_file():
        return "hf"
    if _is_run_folder(path):
        return "run"
    what = "is not a folder" if not path.is_dir() else f"has neither {CONFIG_FILE} nor a checkpoint (ckpt-N.pt, ckpt-N/)"
    raise HFError(f"{path} {what}: expected a Hugging Face model folder or a run folder of train.py")


def pretrained_config(path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model folder or of a run folder of this project."""
    path = Path(path)
    if _kind(path) == "hf":
        return read_config(path)
    found = _run_checkpoint(path)
    try:
        return ModelConfig(**found[2]["config"]["model"])
    except (TypeError, ValueError) as e:
        raise HFError(f"{found[1]} does not match model.py: {_first_line(e)}") from None


def open_weights(path, shapes: dict, tied: bool) -> dict:
    """Our parameter name -> lazily read tensor, for a Hugging Face folder or a run folder's ckpt-N.pt,
    checked against `shapes` (name -> shape of every parameter, the tied head counted once)."""
    path = Path(path)
    if _kind(path) == "hf":
        def ignore(name):  # old checkpoints hold RoPE's frequencies, which config.json determines
            return name.endswith(".rotary_emb.inv_freq") or (tied and name == "lm_head.weight")
        return _match(_hf_tensors(path), shapes, hf_name, ignore, path)
    kind, file, state = _run_checkpoint(path)
    if kind == "dcp":
        raise HFError(f"{path} holds a sharded FSDP checkpoint; run `python train.py --consolidate {path}` first")
    return _match(state["model"], shapes, lambda name: name, lambda name: tied and name == "output.weight", file)


def check_weights(path, config: ModelConfig):
    """Open the weight files of `path` and check their names and shapes against `config`, reading
    only their headers."""
    path = Path(path)
    if _kind(path) == "run" and _run_checkpoint(path)[0] == "dcp":
        return  # torch.distributed.checkpoint checks them when it loads
    with torch.device("meta"):
        shapes = {name: param.shape for name, param in Transformer(config).named_parameters()}
    open_weights(path, shapes, config.tie_embeddings)


class _Progress:
    """A progress line on stderr (MB, MB/s, ETA), at most once a second."""

    def __init__(self, label: str, total_bytes: int, verbose: bool):
        self.label, self.total, self.verbose = label, total_bytes, verbose
        self.done, self.start, self.last = 0, time.time(), 0.0

    def add(self, n_bytes: int, final=False):
        self.done += n_bytes
        now = time.time()
        if not self.verbose or (not final and now - self.last < 1):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = f"  ETA {(self.total - self.done) / rate:4.0f}s" if not final and rate else ""
        print(f"\r{self.label}: {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB  {rate / 1e6:,.0f} MB/s{eta}",
              end="\n" if final else "", file=sys.stderr, flush=True)


def _local_part(param):
    """The tensor this rank holds of `param`, and the index of that part in the full parameter."""
    from torch.distributed.tensor import DTensor
    if not isinstance(param, DTensor):
        return param, slice(None)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return param.to_local(), tuple(slice(start, start + size) for start, size in zip(offset, shape))


@torch.no_grad()
def load_weights(model: Transformer, path, verbose: bool = True):
    """Copy the weights in `path` (a Hugging Face model folder or a run folder) into `model`, whose
    parameters are already allocated on their device: plain tensors, or this rank's shards after
    FSDP2's fully_shard, in which case only the rows of those shards are read from disk. A sharded
    ckpt-N/ is read with torch.distributed.checkpoint, which also reads each rank's part only."""
    path = Path(path)
    shapes = {name: param.shape for name, param in model.named_parameters()}  # the tied head counted once
    if _kind(path) == "run" and (found := _run_checkpoint(path))[0] == "dcp":
        return _load_dcp(model, found[1], shapes)
    tensors = open_weights(path, shapes, model.config.tie_embeddings)
    parts = {name: _local_part(param) for name, param in model.named_parameters()}
    progress = _Progress(f"reading {path}", sum(p.numel() * p.element_size() for p, _ in parts.values()), verbose)
    for name, (local, index) in parts.items():
        if local.numel():
            local.copy_(tensors[name][index])
        progress.add(local.numel() * local.element_size())
    progress.add(0, final=True)


def _load_dcp(model, folder: Path, shapes: dict):
    import torch.distributed.checkpoint as dcp
    state = {"model": {name: param for name, param in model.state_dict().items() if name in shapes}}
    try:
        with warnings.catch_warnings():  # DCP warns when it runs in a single process, which is fine here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=folder)
    except Exception as e:  # DCP wraps every failure, on any rank, in its own exception types
        raise HFError(f"cannot load {folder}: {_first_line(e)}") from None


def load_model(folder, device="cpu", dtype=torch.float32) -> Transformer:
    """A Hugging Face Llama/Mistral folder as a Transformer on `device` in `dtype`, in eval mode,
    converted tensor by tensor (no fp32 copy of a bf16 model on its way to a GPU)."""
    config = read_config(folder)
    with torch.device("meta"):
        shapes = {name: param.shape for name, param in Transformer(config).named_parameters()}
    tensors = open_weights(folder, shapes, config.tie_embeddings)
    state = {name: tensor[:].to(device=device, dtype=dtype) for name, tensor in tensors.items()}
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return Transformer.from_state_dict(config, state).eval()


def export(model: Transformer, tokenizer, folder, max_shard_bytes: int = MAX_SHARD_BYTES, verbose: bool = True):
    """Write `model` and `tokenizer` as a complete Hugging Face LlamaForCausalLM folder: config.json,
    generation_config.json, the fp32 weights as safetensors (in shards of at most max_shard_bytes,
    with model.safetensors.index.json, past one shard), tokenizer.json and tokenizer_config.json.

    Everything is written to a temporary folder first and then moved in file by file; weight files
    of an earlier export that this one does not write are removed afterwards.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise HFError("exporting needs the safetensors package: pip install safetensors") from None
    folder = Path(folder)
    if _is_run_folder(folder):
        raise HFError(f"{folder} is a run folder; export to a folder of its own")
    c = model.config
    bos_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id  # ours: a document starts after EOT
    config = hf_config(c, bos_id, tokenizer.eos_id)
    # with tied embeddings transformers re-ties lm_head itself (and safetensors refuses shared tensors)
    state = {hf_name(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
             if not (c.tie_embeddings and k == "output.weight")}
    shards, size = [{}], 0
    for name, tensor in state.items():
        n_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + n_bytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += n_bytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        progress = _Progress(f"writing {folder}", sum(t.numel() * 4 for t in state.values()), verbose)
        for name, shard in zip(names, shards):
            save_file(shard, tmp / name, metadata={"format": "pt"})
            progress.add(sum(t.numel() * 4 for t in shard.values()))
        progress.add(0, final=True)
        if len(shards) > 1:
            weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
            index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": bos_id, "eos_token_id": tokenizer.eos_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_tokenizer(tokenizer, tmp)
        written = {path.name for path in tmp.iterdir()}
        folder.mkdir(parents=True, exist_ok=True)
        for path in tmp.iterdir():
            atomic.replace(path, folder / path.name)
        for pattern in ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*"):
            for stale in folder.glob(pattern):
                if stale.name not in written:
                    stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
