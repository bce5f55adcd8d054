"""A Llama-style decoder-only Transformer in one file: pre-norm blocks (RMSNorm or LayerNorm),
rotary position embeddings, grouped-query attention, a SwiGLU feed-forward, no biases, a KV cache
for decoding. Parameter names follow Meta's Llama code (`layers.3.attention.wq.weight`, ...)."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets equal to this contribute nothing to the loss
LOSS_CHUNK_ELEMENTS = 1 << 26  # the most logits the loss computes at once (256 MB in fp32)


def _require(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # None -> n_heads; fewer gives grouped-query attention
    ffn_hidden: int | None = None  # None -> Llama's rule, see hidden_dim
    multiple_of: int = 256
    max_seq_len: int = 256
    norm: str = "rmsnorm"  # or "layernorm"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama 3.1's RoPE scaling (Hugging Face rope_type "llama3"): see rope_frequencies; 1 = off.
    rope_scale_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False
    dropout: float = 0.0  # of each block's attention and feed-forward outputs, in training

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            _require(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_kv_heads", "ffn_hidden"):
            v = getattr(self, name)
            _require(v is None or v > 0, f"{name} must be positive, got {v}")
        dim, heads, kv, norm = self.dim, self.n_heads, self.kv_heads, self.norm
        _require(dim % heads == 0, f"dim {dim} is not divisible by n_heads {heads}")
        _require(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        _require(heads % kv == 0, f"n_heads {heads} is not divisible by n_kv_heads {kv}")
        norms = ("rmsnorm", "layernorm")
        _require(norm in norms, f"norm must be 'rmsnorm' or 'layernorm', got {norm!r}")
        factor, low = self.rope_scale_factor, self.rope_low_freq_factor
        high, original = self.rope_high_freq_factor, self.rope_original_max_seq_len
        _require(factor >= 1.0, f"rope_scale_factor must be >= 1 (1 = no scaling), got {factor}")
        _require(
            0 < low < high < math.inf and original > 0,
            "RoPE scaling needs 0 < rope_low_freq_factor < rope_high_freq_factor and "
            f"rope_original_max_seq_len > 0, got {low}, {high}, {original}",
        )
        _require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            _require(math.isfinite(v) and v > 0, f"{name} must be a positive number, got {v}")

    # Derived sizes are properties, not fields set in __post_init__: dataclasses.replace recomputes.
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def rope_scaling(self) -> tuple | None:
        """(factor, low_freq_factor, high_freq_factor, original_max_seq_len), or None when off."""
        if self.rope_scale_factor == 1.0:
            return None
        low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
        return (self.rope_scale_factor, low, high, self.rope_original_max_seq_len)

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        # SwiGLU has three matrices, not two: Llama takes 2/3 of 4*dim to keep an MLP's parameters.
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


def _fp32(x):
    # Upcast half precision for numerically sensitive steps; float64 stays (gradcheck is exact).
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    # nn.RMSNorm computes in the input dtype; a mean of squares in bf16 is too coarse.
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def reset_parameters(self):
        nn.init.ones_(self.weight)

    def forward(self, x):
        return F.rms_norm(_fp32(x), (x.size(-1),), _fp32(self.weight), self.eps).type_as(x)


def make_norm(config: ModelConfig) -> nn.Module:
    norm = RMSNorm if config.norm == "rmsnorm" else nn.LayerNorm
    return norm(config.dim, config.norm_eps)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None, device=None):
    """The rotation speeds theta^(-2i/head_dim), i < head_dim/2, in radians per position (float64),
    stretched by scaling = (factor, low, high, original_context) as Llama 3.1 does."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=device).double() / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high, original_context = scaling
    wavelength = 2 * math.pi / inv_freq
    blend = ((original_context / wavelength - low) / (high - low)).clamp(0, 1)
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None, scaling=None):
    """cos and sin of the angles pos * rope_frequencies(...), shape (seq_len, head_dim/2)."""
    # Angles are formed in float64: in float32 an angle near 4000 rad is only good to ~5e-4.
    inv_freq = rope_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H, head_dim) by position, pairing dimension i with i + head_dim/2: Hugging
    Face's "rotate_half" layout, so wq and wk copy straight from its checkpoints (not Meta's)."""
    x1, x2 = _fp32(x).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def _loss_sum(h, weight, targets):
    # Softmax over a large vocabulary loses accuracy in bf16, so the logits are upcast first.
    logits = _fp32(F.linear(h, weight))
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(h, weight, targets, chunk_elements: int = LOSS_CHUNK_ELEMENTS):
    """Mean cross-entropy of the logits h @ weight.T against targets, in checkpointed chunks of at
    most chunk_elements logits: all of them in fp32 at once can take many GB."""
    h, targets = h.flatten(0, 1), targets.flatten()
    count = (targets != IGNORE_INDEX).sum()
    chunk = max(1, chunk_elements // weight.size(0))
    if h.size(0) <= chunk:  # small enough: no recomputation
        return _loss_sum(h, weight, targets) / count
    parts = zip(h.split(chunk), targets.split(chunk))
    total = sum(checkpoint(_loss_sum, hs, weight, ts, use_reentrant=False) for hs, ts in parts)
    return total / count


def attention(q, k, v, mask, enable_gqa: bool):
    """softmax(q k^T / sqrt(head_dim)) v over (B, heads, T, head_dim), causal when `mask` is None.
    Under CPU autocast it runs in fp32: PyTorch's CPU attention is slower in bf16. No dropout of
    the attention weights: it would turn the fused kernels off."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            out = attention(q.float(), k.float(), v.float(), mask, enable_gqa)
        return out.type_as(q)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=enable_gqa
    )


class KVCache(nn.Module):
    """Pre-allocated keys and values, so decoding never reallocates; never part of a checkpoint."""

    def __init__(self, batch_size, n_kv_heads, seq_len, head_dim, device, dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, start_pos: int, k, v):
        """Write k, v (B, n_kv_heads, T, head_dim) at start_pos; return everything cached so far."""
        B, end = k.size(0), start_pos + k.size(2)
        self.k[:B, :, start_pos:end] = k
        self.v[:B, :, start_pos:end] = v
        return self.k[:B, :, :end], self.v[:B, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, start_pos: int | None = None, mask=None):
        """start_pos given: decode with the KV cache, attending under `mask` (T, start_pos + T)."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, head_dim)
        if start_pos is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
        y = attention(q, k, v, mask, self.n_kv_heads != self.n_heads)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, -1)))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.resid_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = make_norm(config)
        self.ffn_norm = make_norm(config)

    def forward(self, x, cos, sin, start_pos: int | None = None, mask=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        self.loss_chunk_elements = LOSS_CHUNK_ELEMENTS
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = make_norm(config)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)  # tied in init_weights
        self._build_rope()
        self.init_weights()

    def _build_rope(self, device=None):
        # Non-persistent buffers: derived from the config, so not part of a checkpoint.
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, device, c.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # Every .to(), .bfloat16() and to_empty() comes here. The RoPE tables are rebuilt in fp32:
        # in bf16 angles keep 3 significant digits, and to_empty() would leave them uninitialised.
        super()._apply(fn, recurse)
        self._build_rope(self.rope_cos.device)
        return self

    @torch.no_grad()
    def init_weights(self):
        self._tie()
        # GPT-2: the residual projections shrink by 1/sqrt(2 * n_layers), so variance stays flat.
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith((".wo", ".w2")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.reset_parameters()  # weight ones, bias zeros

    def _tie(self):
        if self.config.tie_embeddings:
            # Not in __init__: to_empty() and load_state_dict(assign=True) would silently untie.
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse=True):
        super().to_empty(device=device, recurse=recurse)
        self._tie()
        return self

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state_dict: dict) -> "Transformer":
        """A model that takes over state_dict's tensors: no random init, no second copy of them."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, assign=True)
        model._tie()
        model._build_rope(model.tok_embeddings.weight.device)
        return model

    def forward(self, tokens, targets=None, start_pos: int | None = None):
        """(logits, None) without targets; (None, mean cross-entropy) with them, never holding
        the whole batch's logits (see chunked_cross_entropy). start_pos: decode with a KV cache."""
        B, T = tokens.shape
        pos, mask = start_pos or 0, None
        if start_pos is not None:
            cache = self.layers[0].attention.kv_cache
            if cache is None:
                raise RuntimeError("forward(start_pos=...) needs setup_kv_cache() first")
            batch, length = cache.k.size(0), cache.k.size(2)
            if start_pos < 0 or start_pos + T > length or B > batch:
                where = f"positions {start_pos}..{start_pos + T - 1} x batch {B} do not fit the KV"
                raise ValueError(f"{where} cache (batch {batch}, length {length})")
            # Query i sits at start_pos + i and sees keys up to there (is_causal aligns top-left).
            key_pos = torch.arange(start_pos + T, device=tokens.device)
            mask = key_pos[None, :] <= start_pos + torch.arange(T, device=tokens.device)[:, None]
        elif T > self.config.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.config.max_seq_len}")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                # Keep only each block's input; recompute the rest in backward.
                h = checkpoint(layer, h, cos, sin, start_pos, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, start_pos, mask)
        h = self.norm(h)
        if targets is None:
            return self.output(h), None
        return None, chunked_cross_entropy(h, self.output.weight, targets, self.loss_chunk_elements)

    def setup_kv_cache(self, batch_size: int, max_seq_len=None, device=None, dtype=None):
        c = self.config
        seq_len = c.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < seq_len <= c.max_seq_len:
            limit = f"1..{c.max_seq_len} (the RoPE table)"
            raise ValueError(f"KV cache length must be in {limit}, got {seq_len}")
        device = self.output.weight.device if device is None else device
        dtype = self.output.weight.dtype if dtype is None else dtype
        for layer in self.layers:
            cache = KVCache(batch_size, c.kv_heads, seq_len, c.head_dim, device, dtype)
            layer.attention.kv_cache = cache

    def clear_kv_cache(self):
        """Free the caches; forward(start_pos=...) then needs setup_kv_cache() again."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (a tied table once); exclude_embedding drops an untied input table."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.config.tie_embeddings:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, PaLM appendix B: 6N (N = num_params(exclude_embedding=True))
        plus 12*L*H*Q*T for attention over L layers, H heads of size Q, T tokens of context."""
        c = self.config
        T = c.max_seq_len if seq_len is None else seq_len
        attention_flops = 12 * c.n_layers * c.n_heads * c.head_dim * T
        return 6 * self.num_params(exclude_embedding=True) + attention_flops
