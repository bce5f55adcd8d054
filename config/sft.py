"""Supervised fine-tuning: a base model (a run of this project, or a Hugging Face Llama folder)
trained on conversations, the loss on the assistant's replies only (infra/chat.py).

    python train.py config/sft.py --init_from=out/default --inputs=chats.jsonl
    python sample.py --ckpt out/sft --chat

The model's shape and tokenizer come from init_from; a model without a chat template gets ChatML
(two special tokens, and rows for them in its embedding and output tables). A step trains on
global_batch_tokens / max_seq_len conversations (32 at the default model's 128-token context),
each a row of its own. The learning rate is half of the default model's pretraining one; models
of a billion parameters and more fine-tune at about 1e-5 (--lr=1e-5).
"""

from config import TrainConfig

config = TrainConfig(
    chat=True,
    data_dir="out/data/sft",
    out_dir="out/sft",
    optimizer="adamw",
    lr=1e-3,
    min_lr_ratio=0.1,
    warmup_steps=20,
    max_steps=300,
    eval_interval=50,
    eval_tokens=8192,
    ckpt_interval=100,
    sample_tokens=0,
)
