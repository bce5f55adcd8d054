"""Muon for the hidden matrices, AdamW for the rest, as one optimizer (train.py OPTIMIZERS).

Muon (https://kellerjordan.github.io/posts/muon/, as in modded-nanogpt and nanochat) runs SGD
with Nesterov momentum, then replaces each matrix's update by the nearest semi-orthogonal matrix
(all singular values ~1), computed by a few Newton-Schulz iterations, and scales it by
sqrt(max(1, rows / cols)). Embeddings, the output head and norms stay with AdamW: a param group
with `muon=True` is stepped by Muon, any other by AdamW.

Under DDP every rank holds the averaged gradient and computes the same update. Under FSDP2 a
matrix's gradient is a DTensor sharded on dim 0: each rank gathers the whole momentum-mixed
gradient, orthogonalizes it and keeps the rows of its own shard, so the update is the one a
single rank computes (every rank orthogonalizes every matrix).
"""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from config import TrainConfig

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic; modded-nanogpt's, steep at zero


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with the singular vectors of `g`: U S' V^T where
    g = U S V^T and S' lies roughly in [0.7, 1.2] (the iteration trades exactness for speed)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()  # as modded-nanogpt: the iteration tolerates its rounding, and it is faster
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon on param groups with `muon=True` (2-D weights), AdamW on the others. Every group has
    lr and weight_decay (decoupled: weights shrink by lr * weight_decay each step)."""

    def __init__(self, groups, lr: float, momentum=0.95, ns_steps=5, betas=(0.9, 0.95), eps=1e-8):
        defaults = dict(
            lr=lr,
            weight_decay=0.0,
            muon=False,
            momentum=momentum,
            ns_steps=ns_steps,
            betas=betas,
            eps=eps,
        )
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon steps 2-D weights only")

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                (self._muon if group["muon"] else self._adamw)(p, group, self.state[p])

    def _muon(self, p, group, state):
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - momentum)
        g = p.grad.lerp(buf, momentum)  # Nesterov
        if isinstance(g, DTensor):  # an FSDP shard: the whole matrix, then this rank's rows
            update = orthogonalize(g.full_tensor(), group["ns_steps"])
            update = distribute_tensor(update, g.device_mesh, g.placements, src_data_rank=None)
        else:
            update = orthogonalize(g, group["ns_steps"])
        p.add_(update, alpha=-group["lr"] * max(1, p.size(-2) / p.size(-1)) ** 0.5)

    def _adamw(self, p, group, state):
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        # the count on the host: no device sync, and no value read from a traced (fake) tensor
        state["step"] = step = state.get("step", 0) + 1
        beta1, beta2 = group["betas"]
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))


def muon_adamw(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> Muon:
    """Muon at muon_lr, with weight decay, for the blocks' matrices; AdamW at lr for embeddings,
    output head and norms, as nanochat has it. The loop sets each group's rate to lr x lr_scale."""
    matrices = [p for p in model.layers.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if not any(p is q for q in matrices)]
    groups = [
        dict(
            params=matrices, muon=True, weight_decay=cfg.weight_decay, lr_scale=cfg.muon_lr / cfg.lr
        ),
        dict(params=rest, lr_scale=1.0),
    ]
    return Muon(groups, cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
