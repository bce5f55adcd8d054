"""Llama-2-7B: the published shape (6,738,415,616 parameters) and its pretraining recipe.

    python train.py config/7b.py --dry-run --world-size=8        # memory per GPU, no GPU needed
    torchrun --standalone --nproc_per_node=8 train.py config/7b.py --inputs=/data/my_corpus

Recipe as in the Llama 2 paper: context 4096, a global batch of 4M tokens (1024 sequences),
AdamW (beta 0.9, 0.95; eps 1e-5), lr 3e-4 with 2000 warmup steps and cosine decay to 10%, weight
decay 0.1, gradient clipping 1.0. FSDP2 shards weights, gradients and Adam state across the
ranks; bf16 compute with fp32 reductions; every block recomputes its activations in the backward
pass. The micro-batch is the largest the GPU holds (`--dry-run` shows it for an 80 GB and a
141 GB card), and a checkpoint is written at least every hour.
"""

from config import TrainConfig
from model import ModelConfig

config = TrainConfig(
    model=ModelConfig(
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        ffn_hidden=None,
        multiple_of=256,
        max_seq_len=4096,
        norm="rmsnorm",
        norm_eps=1e-5,
        rope_theta=10000.0,
        tie_embeddings=False,
        dropout=0.0,
    ),
    inputs=[
        "data/corpus"
    ],  # your text files, folders or .jsonl; override with --inputs=PATH[,PATH]
    data_dir="out/data/7b",
    tokenizer_max_bytes=2_000_000_000,
    out_dir="out/7b",
    micro_batch_size=0,  # the largest that fits the GPU, from the memory estimate
    global_batch_tokens=1024 * 4096,
    max_steps=500_000,  # 2T tokens, as Llama 2
    optimizer="adamw",
    lr=3e-4,
    min_lr_ratio=0.1,
    warmup_steps=2000,
    weight_decay=0.1,
    beta1=0.9,
    beta2=0.95,
    adam_eps=1e-5,
    grad_clip=1.0,
    eval_interval=1000,
    eval_tokens=4 * 1024 * 4096,
    log_interval=10,
    ckpt_interval=1000,
    ckpt_every_minutes=60,  # an hour of the cluster at most between checkpoints
    keep_checkpoints=2,  # ~81 GB each (fp32 weights + AdamW moments)
    sample_tokens=0,
    dtype="bfloat16",
    parallel="fsdp",
    activation_checkpointing=True,
    compile=False,
)
