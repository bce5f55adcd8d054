"""Hugging Face interop: Llama-family model folders, in both directions.

Models. A Hugging Face model folder is config.json plus weights: one model.safetensors, shards
model-0000N-of-0000M.safetensors listed in model.safetensors.index.json, or pytorch_model.bin
(also sharded with pytorch_model.bin.index.json; read with weights_only=True). `read_config` maps
config.json to a ModelConfig for LlamaForCausalLM (Llama 2, Llama 3.x with rope_type "llama3",
TinyLlama, SmolLM) and MistralForCausalLM, and refuses, with one line, every setting that would
make the model compute something model.py does not (biases, another activation or RoPE scaling,
a head_dim other than dim / n_heads, quantized weights); Mistral's sliding window becomes the
context. model.py uses Hugging Face's rotate-half RoPE layout and its parameters map one to one
onto Hugging Face's names, so import and export rename tensors and never permute them.

Weights are read lazily, tensor by tensor (safetensors slices; torch.load(mmap=True) for .bin).
`load_weights` copies them into a model already allocated on its device, possibly sharded by
FSDP2: each rank reads only the rows of its own shards, so importing a 7B model under torchrun
never holds a full copy of the weights per rank in host memory. It also reads run folders of this
project (the newest ckpt-N.pt, or an FSDP run's ckpt-N/), which `train.py --init_from` needs, and
`start_from` gives a run the model of its init_from folder.

`export` writes a complete folder that transformers' from_pretrained, AutoTokenizer and
pipeline("text-generation") load, into a new or empty folder or over an earlier export (never
over anything else). Tokenizer files (tokenizer.json, tiktoken's) are tokenizer_formats.py's.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from config import ConfigError, TrainConfig
from infra import checkpoint
from infra.files import first_line, fsync, replace
from infra.progress import Progress
from infra.tokenizer_formats import write_tokenizer
from infra.tokenizers import load_tokenizer
from model import ModelConfig, Transformer
from tokenizer import Tokenizer, UserError

CONFIG_FILE = "config.json"
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # model_type -> class
VOCABULARY_TABLES = ("tok_embeddings.weight", "output.weight")  # a row per token id
MAX_SHARD_BYTES = 5 * 2**30  # export: transformers' default shard size
EXPORTED_BY = "sample.py --export-hf"  # config.json's "exported_by": an export of this project
# Every file an export writes; a folder holding only these, with EXPORTED_BY, is an earlier export.
EXPORT_FILES = re.compile(
    r"config\.json|generation_config\.json|model(-\d{5}-of-\d{5})?\.safetensors|"
    r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json"
)


class HFError(UserError):
    """A model folder that cannot be imported or exported; the message (one line) says why."""


# --- models

# Our parameter names (Meta's Llama code) -> Hugging Face's.
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(name: str) -> str:
    """Hugging Face's name for one of our parameters:
    layers.3.attention.wq.weight -> model.layers.3.self_attn.q_proj.weight."""
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, i, sub = module.split(".", 2)
        return f"model.layers.{i}.{_LAYER[sub]}.{param}"
    return f"{_TOP[module]}.{param}"


def _shapes(config: ModelConfig) -> dict:
    """Parameter name -> shape of a model of `config` (the tied head counted once), allocating
    nothing."""
    with torch.device("meta"):
        return {name: param.shape for name, param in Transformer(config).named_parameters()}


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
        raise HFError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(hf, dict):
        raise HFError(f"{path} is not a JSON object")

    def refuse(what, why="model.py does not compute it"):
        raise HFError(f"{path}: {what} is not supported ({why})")

    model_type, architectures = hf.get("model_type"), hf.get("architectures") or []
    if model_type not in SUPPORTED or architectures not in ([], [SUPPORTED[model_type]]):
        name = "/".join(map(str, architectures)) or model_type
        refuse(f"architecture {name!r}", f"this imports {' and '.join(SUPPORTED.values())}")

    def number(key, default=None, kind=(int, float), rope_dict=None):
        value = (hf if rope_dict is None else rope_dict).get(key, default)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if type(value) not in kinds or not 0 < value < math.inf:
            what = "integer" if kind is int else "number"
            raise HFError(f"{path}: {key} must be a positive {what}, got {value!r}")
        return value

    for key, wrong, what in (
        ("hidden_act", lambda v: v != "silu", "hidden_act {} (only silu)"),
        ("attention_bias", bool, "attention_bias {} (biases)"),
        ("mlp_bias", bool, "mlp_bias {} (biases)"),
        ("attention_dropout", bool, "attention_dropout {} (dropout is --model.dropout here)"),
        (
            "quantization_config",
            lambda v: v is not None,
            "quantization_config {} (quantized weights)",
        ),
    ):
        if key in hf and wrong(hf[key]):
            refuse(what.format(json.dumps(hf[key])))

    dim, n_heads = number("hidden_size", kind=int), number("num_attention_heads", kind=int)
    if hf.get("head_dim") is not None and hf["head_dim"] * n_heads != dim:
        head_dim = hf["head_dim"]
        refuse(f"head_dim {head_dim} (not hidden_size / num_attention_heads = {dim / n_heads:g})")
    n_kv_heads = n_heads
    if hf.get("num_key_value_heads") is not None:
        n_kv_heads = number("num_key_value_heads", kind=int)
    context = number("max_position_embeddings", 2048 if model_type == "llama" else 131072, int)
    if model_type == "mistral" and hf.get("sliding_window", 4096) is not None:
        context = min(context, number("sliding_window", 4096, kind=int))

    # RoPE: transformers 5 writes rope_parameters (rope_theta inside), older ones rope_theta and
    # rope_scaling.
    if hf.get("rope_parameters") and hf.get("rope_scaling"):
        raise HFError(
            f"{path} has both rope_parameters and rope_scaling; keep the one that is meant"
        )

    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise HFError(f"{path}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse("partial_rotary_factor (RoPE on part of each head)")
    scaling = {}
    if rope_type == "llama3":
        original = number("original_max_position_embeddings", context, int, rope)
        scaling = dict(
            rope_scale_factor=float(number("factor", rope_dict=rope)),
            rope_low_freq_factor=float(number("low_freq_factor", rope_dict=rope)),
            rope_high_freq_factor=float(number("high_freq_factor", rope_dict=rope)),
            rope_original_max_seq_len=original,
        )
    elif rope_type != "default":
        refuse(f"RoPE scaling {rope_type!r} (only Llama 3.1's 'llama3')")
    theta = number("rope_theta", hf.get("rope_theta", 10000.0), rope_dict=rope)
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise HFError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}")
    try:
        return ModelConfig(
            vocab_size=number("vocab_size", kind=int),
            dim=dim,
            n_layers=number("num_hidden_layers", kind=int),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_hidden=number("intermediate_size", kind=int),
            max_seq_len=context,
            norm="rmsnorm",
            norm_eps=float(number("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_embeddings=tie,
            dropout=0.0,
            **scaling,
        )
    except ValueError as e:
        raise HFError(f"{path}: {first_line(e)}") from None


# The ModelConfig fields hf_config maps; a field a fork adds (a sliding window, say) exports only
# while it holds its default, so that no model exports as a Llama that computes something else.
EXPORTED_FIELDS = """vocab_size dim n_layers n_heads n_kv_heads ffn_hidden multiple_of max_seq_len
norm norm_eps rope_theta rope_scale_factor rope_low_freq_factor rope_high_freq_factor
rope_original_max_seq_len tie_embeddings dropout""".split()


def hf_config(config: ModelConfig, bos_id: int | None, eos_id: int | None) -> dict:
    """config.json of a LlamaForCausalLM equal to `config`, in a form transformers 4 and 5 read,
    marked as an export of this project."""
    for field in dataclasses.fields(config):
        if field.name not in EXPORTED_FIELDS and getattr(config, field.name) != field.default:
            raise HFError(
                f"model.{field.name}={getattr(config, field.name)!r} has no counterpart in "
                "Hugging Face's Llama: map it in infra/hf.py hf_config to export this model"
            )
    if config.norm != "rmsnorm":
        raise HFError(
            f"this model uses norm={config.norm!r}; Hugging Face Llama only has RMSNorm, "
            "so it cannot be exported"
        )
    rope_scaling = None
    if config.rope_scaling is not None:
        factor, low, high, original = config.rope_scaling
        rope_scaling = dict(
            rope_type="llama3",
            factor=factor,
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=original,
        )
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        torch_dtype="float32",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        exported_by=EXPORTED_BY,
    )


class _GrownTable:
    """A vocabulary table of a file with rows appended up to `rows`, each the mean of the file's
    rows: a token a chat template adds starts as the average token (its logit the average
    logit), not as noise."""

    def __init__(self, tensor, rows: int):
        self.tensor, self.rows = tensor, rows

    def __getitem__(self, index):
        table = self.tensor[:].float()
        added = table.mean(dim=0, keepdim=True).expand(self.rows - len(table), -1)
        return torch.cat([table, added])[index]


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
            raise HFError(f"reading {path} needs the safetensors package: pip install safetensors")
        try:
            handle = safe_open(str(path), framework="pt")
            return {name: _SafetensorsTensor(handle, name) for name in handle.keys()}
        except Exception as e:  # safetensors raises its own error type, or OSError
            why = first_line(e)
            raise HFError(f"{path} is truncated or not a safetensors file ({why})") from None
    try:  # mmap: tensors are paged in when read, so a 15 GB file costs nothing until then
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        why = first_line(e)
        raise HFError(f"{path} is truncated or not a PyTorch weights file ({why})") from None
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
                why = first_line(e)
                raise HFError(f"{index} is corrupt (no readable weight_map: {why})") from None
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        tensors = {}
        for name in files:
            tensors.update(_open_file(folder / name, kind))
        return tensors
    raise HFError(
        f"{folder} has no weights: expected model.safetensors, model-0000N-of-0000M.safetensors "
        "with model.safetensors.index.json, or pytorch_model.bin"
    )


def _match(tensors: dict, shapes: dict, file_name, ignore, where, new_rows=False) -> dict:
    """Our name -> lazy tensor for every name in `shapes`, checking that the file holds exactly
    those (besides names `ignore` accepts) with the same shapes, in floating point. With
    `new_rows`, a vocabulary table may have fewer rows than the model's (the tokens a chat
    template adds): load_weights fills the rest."""

    wanted = {file_name(name): name for name in shapes}
    unexpected = [n for n in tensors if n not in wanted and not ignore(n)]
    if unexpected:
        hint = " (biases are not supported)" if unexpected[0].endswith(".bias") else ""
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise HFError(f"{where} holds {unexpected[0]}{more}, which this model does not have{hint}")
    missing = [n for n in wanted if n not in tensors]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise HFError(f"{where} lacks {missing[0]}{more}")
    for file_key, name in wanted.items():
        tensor, want = tensors[file_key], tuple(shapes[name])
        fewer_rows = new_rows and name in VOCABULARY_TABLES and tensor.shape[1:] == want[1:]
        if tuple(tensor.shape) != want and not (fewer_rows and tensor.shape[0] < want[0]):
            raise HFError(
                f"{where}: {file_key} has shape {list(tensor.shape)} but the model's config gives "
                f"{list(shapes[name])}"
            )
        if not tensor.is_floating_point():
            raise HFError(
                f"{where}: {file_key} is {tensor.dtype}, not floating point "
                "(quantized weights are not supported)"
            )
    return {name: tensors[file_key] for file_key, name in wanted.items()}


def _run_checkpoint(folder: Path):
    """("file", ckpt-N.pt, state) or ("dcp", ckpt-N/, train state): a run folder's newest
    checkpoint."""
    found = [checkpoint.latest(folder, sharded=False), checkpoint.latest(folder, sharded=True)]
    found = [path for path in found if path]
    if not found:
        raise HFError(f"{folder} holds no complete checkpoint (ckpt-N.pt or ckpt-N/)")
    newest = max(found, key=checkpoint.step_of)
    try:
        if newest.is_dir():
            return "dcp", newest, _load_run_file(newest / checkpoint.TRAIN_STATE_FILE)
        return "file", newest, _load_run_file(newest)
    except HFError as error:
        older = checkpoint.older_than(newest)
        if older is None:
            raise
        raise HFError(
            f"{error}; to start from the one before it ({older.name}), move {newest.name} "
            "aside (resuming that run with --resume does)"
        ) from None


def _load_run_file(path: Path) -> dict:
    try:  # mmap: only what is used of a ckpt-N.pt (weights, not optimizer state) is ever read
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise HFError(f"{path} is corrupt or not a checkpoint ({first_line(e)})") from None
    version = checkpoint.FORMAT_VERSION
    config = state.get("config") if isinstance(state, dict) else None
    ours = isinstance(config, dict) and isinstance(config.get("model"), dict)
    if not (ours and state.get("version") == version):
        raise HFError(f"{path} is not a version-{version} checkpoint of this project")
    return state


def _is_run_folder(path: Path) -> bool:
    return bool(
        checkpoint.list_checkpoints(path, sharded=False)
        or checkpoint.list_checkpoints(path, sharded=True)
    )


def _kind(path: Path) -> str:
    if (path / CONFIG_FILE).is_file():
        return "hf"
    if _is_run_folder(path):
        return "run"
    what = "is not a folder"
    if path.is_dir():
        what = f"has neither {CONFIG_FILE} nor a checkpoint (ckpt-N.pt, ckpt-N/)"
    expected = "a Hugging Face model folder or a run folder of train.py"
    raise HFError(f"{path} {what}: expected {expected}")


def pretrained_config(path) -> ModelConfig:
    """The ModelConfig of a Hugging Face model folder or of a run folder of this project."""
    path = Path(path)
    if _kind(path) == "hf":
        return read_config(path)
    _, file, state = _run_checkpoint(path)
    try:
        return ModelConfig(**state["config"]["model"])
    except (TypeError, ValueError) as e:
        raise HFError(f"{file} does not match model.py: {first_line(e)}") from None


def open_weights(path, shapes: dict, tied: bool, new_rows: bool = False) -> dict:
    """Our parameter name -> lazily read tensor, for a Hugging Face folder or a run folder's
    ckpt-N.pt, checked against `shapes` (name -> shape of every parameter, the tied head once;
    with `new_rows`, vocabulary tables may have fewer rows)."""
    path = Path(path)
    if _kind(path) == "hf":

        def ignore(name):  # old checkpoints hold RoPE's frequencies, which config.json determines
            return name.endswith(".rotary_emb.inv_freq") or (tied and name == "lm_head.weight")

        return _match(_hf_tensors(path), shapes, hf_name, ignore, path, new_rows)
    kind, file, state = _run_checkpoint(path)
    if kind == "dcp":
        raise HFError(
            f"{path} holds a sharded FSDP checkpoint; run `python train.py --consolidate "
            f"{path}` first"
        )
    tied_head = {"output.weight"} if tied else set()
    return _match(state["model"], shapes, lambda name: name, tied_head.__contains__, file, new_rows)


def check_weights(path, config: ModelConfig, new_rows: bool = False):
    """Open the weight files of `path` and check their names and shapes against `config`, reading
    only their headers (new_rows: see open_weights)."""
    path = Path(path)
    if _kind(path) == "run" and (found := _run_checkpoint(path))[0] == "dcp":
        _saved_tensors(found[1], _shapes(config), config.tie_embeddings, new_rows)
        return
    open_weights(path, _shapes(config), config.tie_embeddings, new_rows)


def _local_part(param):
    """The tensor this rank holds of `param`, and the index of that part in the full parameter."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, slice(None)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return param.to_local(), tuple(slice(start, start + size) for start, size in zip(offset, shape))


@torch.no_grad()
def load_weights(model: Transformer, path, verbose: bool = True, new_rows: bool = False):
    """Copy the weights in `path` (a Hugging Face model folder or a run folder) into `model`, whose
    parameters are already allocated on their device: plain tensors, or this rank's shards after
    FSDP2's fully_shard, in which case only the rows of those shards are read from disk. A sharded
    ckpt-N/ is read with torch.distributed.checkpoint, which also reads each rank's part only.
    With `new_rows` (a chat run), rows of the vocabulary tables the file lacks are each the mean
    of its rows (a sharded checkpoint's smaller table is then read whole on every rank)."""
    path = Path(path)
    shapes = {name: param.shape for name, param in model.named_parameters()}  # tied head once
    if _kind(path) == "run" and (found := _run_checkpoint(path))[0] == "dcp":
        return _load_dcp(model, found[1], shapes, new_rows)
    tensors = open_weights(path, shapes, model.config.tie_embeddings, new_rows)
    for name, tensor in tensors.items():
        if tensor.shape[0] < shapes[name][0]:
            tensors[name] = _GrownTable(tensor, shapes[name][0])
    parts = {name: _local_part(param) for name, param in model.named_parameters()}
    total = sum(part.numel() * part.element_size() for part, _ in parts.values())
    progress = Progress(f"reading {path}", total, verbose=verbose)
    for name, (local, index) in parts.items():
        if local.numel():
            local.copy_(tensors[name][index])
        progress.add(local.numel() * local.element_size())
    progress.add(0, final=True)


class _SavedTensor:
    """A tensor's entry in a sharded checkpoint's metadata: its shape and dtype, no data."""

    def __init__(self, entry):
        self.shape, self.dtype = entry.size, entry.properties.dtype

    def is_floating_point(self):
        return self.dtype.is_floating_point


def _saved_tensors(folder: Path, shapes: dict, tied: bool, new_rows: bool) -> dict:
    """Our parameter name -> _SavedTensor for a sharded ckpt-N/, checked against `shapes` as
    open_weights checks a file's, from its metadata alone."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        saved = {
            key.removeprefix("model."): _SavedTensor(entry)
            for key, entry in metadata.items()
            if key.startswith("model.")
        }
    except Exception as e:  # a damaged .metadata: unpickling fails in many ways
        raise HFError(f"cannot read {folder}: {first_line(e)}") from None
    tied_head = {"output.weight"} if tied else set()
    return _match(saved, shapes, lambda name: name, tied_head.__contains__, folder, new_rows)


def _load_dcp(model, folder: Path, shapes: dict, new_rows: bool):
    """Load a sharded ckpt-N/ into `model` (plain or FSDP2) with torch.distributed.checkpoint. A
    vocabulary table with fewer rows (new_rows) is read whole into a tensor of its saved shape,
    then grown."""
    import torch.distributed.checkpoint as dcp

    saved = _saved_tensors(folder, shapes, model.config.tie_embeddings, new_rows)
    state = {name: param for name, param in model.state_dict().items() if name in shapes}
    smaller = {
        name: torch.empty(saved[name].shape, dtype=saved[name].dtype)
        for name in shapes
        if saved[name].shape[0] < shapes[name][0]
    }
    try:
        with warnings.catch_warnings():  # DCP warns when it runs in a single process: fine here
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": {**state, **smaller}}, checkpoint_id=folder)
    except BaseException as e:  # DCP's CheckpointException, from any rank, is not an Exception
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise HFError(f"cannot load {folder}: {checkpoint.dcp_failure(e)}") from None
    params = dict(model.named_parameters())
    for name, table in smaller.items():
        local, index = _local_part(params[name])
        local.copy_(_GrownTable(table, shapes[name][0])[index])


def load_model(folder, device="cpu", dtype=torch.float32) -> Transformer:
    """A Hugging Face Llama/Mistral folder as a Transformer on `device` in `dtype`, in eval mode,
    converted tensor by tensor (no fp32 copy of a bf16 model on its way to a GPU)."""
    config = read_config(folder)
    tensors = open_weights(folder, _shapes(config), config.tie_embeddings)
    state = {name: tensor[:].to(device=device, dtype=dtype) for name, tensor in tensors.items()}
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return Transformer.from_state_dict(config, state).eval()


def load_folder(folder, device="cpu", dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """The model (see load_model) and tokenizer of a Hugging Face model folder; the tokenizer is
    read and checked against the model's vocabulary first, since the weights can take a while."""
    tokenizer = load_tokenizer(folder)
    vocab_size = read_config(folder).vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise HFError(
            f"the tokenizer in {folder} has {tokenizer.vocab_size} tokens but the model only "
            f"{vocab_size}"
        )
    return load_model(folder, device, dtype), tokenizer


# --- train.py --init_from

# Model keys a run started from init_from may set; every other one comes from the folder.
INIT_FROM_MODEL_KEYS = ("dropout", "max_seq_len")


def _meaning(model: ModelConfig) -> dict:
    """The model keys with derived sizes in place of the keys that set them (n_kv_heads None and
    n_heads are the same; multiple_of only matters through ffn_hidden; scaling knobs only when
    on)."""
    values = dataclasses.asdict(model)
    values.update(n_kv_heads=model.kv_heads, ffn_hidden=model.hidden_dim, multiple_of=None)
    if model.rope_scaling is None:
        values.update(
            rope_low_freq_factor=None, rope_high_freq_factor=None, rope_original_max_seq_len=None
        )
    return {k: v for k, v in values.items() if k not in INIT_FROM_MODEL_KEYS}


def start_from(config: TrainConfig, file_values: dict, cli_values: dict) -> TrainConfig:
    """`config` with the model of config.init_from (a Hugging Face model folder or a run folder).

    The model keys set by the config file (those that differ from the default model) and by
    --model.* are checked: those in INIT_FROM_MODEL_KEYS are applied (max_seq_len at most
    init_from's), and any other that would change the model is an error. The tokenizer comes
    from init_from unless `tokenizer` names one. (A resumed run takes its config, this model
    included, from its own checkpoint: it never needs init_from again.)
    """
    source = config.init_from
    try:
        pretrained = pretrained_config(source)
    except HFError as e:
        raise ConfigError(f"init_from: {e}") from None
    given = {**file_values, **cli_values}
    for key, value in given.items():
        try:
            same = _meaning(dataclasses.replace(pretrained, **{key: value})) == _meaning(pretrained)
        except ValueError:
            same = False
        if not same:
            origin = f"model.{key}={value} (in the config file)"
            if key in cli_values:
                origin = f"--model.{key}={value}"
            raise ConfigError(
                f"{origin} contradicts {source} ({key}={getattr(pretrained, key)}): with init_from "
                "the model comes from there; only model.dropout and a shorter model.max_seq_len "
                "may be set"
            )
    if given.get("max_seq_len", 0) > pretrained.max_seq_len:
        raise ConfigError(
            f"model.max_seq_len={given['max_seq_len']} is longer than the "
            f"{pretrained.max_seq_len} positions of {source} (its training context or sliding "
            "window); use at most that"
        )
    model = dataclasses.replace(
        pretrained, **{key: given[key] for key in INIT_FROM_MODEL_KEYS if key in given}
    )
    return dataclasses.replace(config, model=model, tokenizer=config.tokenizer or config.init_from)


# --- export


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _remove_stale_temporaries(folder: Path):
    """Delete the temporary folders (DIR.tmp-PID) that exports into `folder` killed midway left
    behind: those of processes no longer running, holding nothing but (partial) export files."""
    pattern = re.compile(re.escape(folder.name) + r"\.tmp-(\d+)")
    for path in folder.parent.iterdir() if folder.parent.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or _is_alive(int(match[1])):
            continue
        # a file being written has a temporary name of its own, beginning or ending its name
        if all(p.is_file() and EXPORT_FILES.search(p.name) for p in path.iterdir()):
            shutil.rmtree(path, ignore_errors=True)


def _is_export(folder: Path) -> bool:
    """Whether `folder` holds nothing but files an export writes, with a config.json that says it
    is one."""
    if not all(p.is_file() and EXPORT_FILES.fullmatch(p.name) for p in folder.iterdir()):
        return False
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("exported_by") == EXPORTED_BY


def _check_target(folder: Path, overwrite: bool):
    """Refuse `folder` unless it is new, empty, or an earlier export that `overwrite` lets this
    one replace."""
    if not folder.name:
        raise HFError(f"{folder} is the root folder; export to a folder of its own")
    if folder.exists() and not folder.is_dir():
        raise HFError(f"{folder} is a file; export to a folder")
    if not folder.exists() or not any(folder.iterdir()):
        return
    if _is_run_folder(folder):
        raise HFError(f"{folder} is a run folder; export to a folder of its own")
    if not _is_export(folder):
        raise HFError(
            f"{folder} holds files that are not an export of this project; export to a new or "
            "empty folder"
        )
    if not overwrite:
        raise HFError(f"{folder} holds an earlier export; add --overwrite to replace it")


def _shards(state: dict, max_shard_bytes: int) -> dict:
    """File name -> the tensors it holds: one model.safetensors, or shards of at most
    max_shard_bytes named as transformers names them."""
    shards, size = [{}], 0
    for name, tensor in state.items():
        n_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + n_bytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += n_bytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    return {f"model-{i:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards, 1)}


def export(
    model: Transformer,
    tokenizer,
    folder,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    verbose: bool = True,
    overwrite: bool = False,
):
    """Write `model` and `tokenizer` as a complete Hugging Face LlamaForCausalLM folder:
    config.json, generation_config.json, the fp32 weights as safetensors (in shards of at most
    max_shard_bytes, with model.safetensors.index.json, past one shard), tokenizer.json and
    tokenizer_config.json, every file with the same mode.

    `folder` must be new, empty, or (with overwrite) an earlier export. Everything is written to
    a temporary folder DIR.tmp-PID first, which then becomes the new folder, or is moved into the
    existing one file by file, config.json first (so that a folder cut short by a kill is still
    an export to replace), before the earlier export's other files are removed. The next export
    removes the temporary folder a killed one left.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise HFError("exporting needs the safetensors package: pip install safetensors") from None
    folder = Path(folder).resolve()
    _check_target(folder, overwrite)
    c = model.config
    bos_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id  # ours: EOT
    config = hf_config(c, bos_id, tokenizer.eos_id)
    # with tied embeddings transformers re-ties lm_head itself (safetensors refuses shared tensors)
    state = {
        hf_name(k): v.detach().to("cpu", torch.float32).contiguous()
        for k, v in model.state_dict().items()
        if not (c.tie_embeddings and k == "output.weight")
    }
    shards = _shards(state, max_shard_bytes)
    total = sum(t.numel() * 4 for t in state.values())

    _remove_stale_temporaries(folder)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        progress = Progress(f"writing {folder}", total, verbose=verbose)
        for name, shard in shards.items():
            save_file(shard, tmp / name, metadata={"format": "pt"})
            progress.add(sum(t.numel() * 4 for t in shard.values()))
        progress.add(0, final=True)
        if len(shards) > 1:
            weight_map = {key: name for name, shard in shards.items() for key in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        template = getattr(tokenizer, "chat_template", None)  # a reply ends at end of turn too
        eos = tokenizer.eos_id if template is None else template.stop_ids(tokenizer)
        generation = {"bos_token_id": bos_id, "eos_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_tokenizer(tokenizer, tmp)
        mode = 0o666 & ~_umask()  # what open() gives; safetensors writes its files 0600
        for path in tmp.iterdir():
            path.chmod(mode)
            fsync(path)
        if not folder.exists():
            replace(tmp, folder)  # all or nothing
            return

        written = sorted(tmp.iterdir(), key=lambda path: path.name != CONFIG_FILE)
        for path in written:
            replace(path, folder / path.name)
        for stale in folder.iterdir():
            if stale.name not in {path.name for path in written}:
                stale.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
