"""Optimizers for the trunk: plain AdamW, or the baseline's Muon + Adam split.

Muon (momentum, then orthogonalise the update with a Newton-Schulz iteration) trains the block
matrices; Adam handles what Muon is not meant for (embedding, head, gains, scales, AdaLN). Every
param group carries ``base_lr`` so the training loop applies its schedule as
``group["lr"] = group["base_lr"] * mult`` without knowing which optimizer it is talking to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from lmkit.errors import LmkitError

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients of the baseline


@dataclass
class OptimConfig:
    """Optimizer settings; the Muon numbers are the parameter-golf baseline's."""

    name: str = "adamw"  # "adamw" | "muon"
    lr: float = 3e-4  # adamw: all params
    weight_decay: float = 0.0  # adamw only: on matrices, embedding and head (never on vectors)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off (the training loop applies it)
    matrix_lr: float = 0.04  # muon: block matrices
    embed_lr: float = 0.05  # muon mode: Adam on the (tied) embedding
    head_lr: float = 0.008  # muon mode: Adam on an untied head
    scalar_lr: float = 0.04  # muon mode: Adam on vectors/scalars and the AdaLN/time MLP
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup: int = 500
    muon_ns_steps: int = 5


OPTIMIZERS = ("adamw", "muon")


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately replace ``g`` by the nearest semi-orthogonal matrix (``U V^T`` of its SVD).

    The quintic iteration pushes every singular value towards 1 (into roughly [0.7, 1.2], which is
    all Muon needs) in a few bf16 matmuls; it works on the wide orientation so ``X X^T`` is small.
    """
    a, b, c = NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + eps)  # Frobenius norm >= spectral norm, so singular values start <= 1
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        xxt = x @ x.T
        x = a * x + (b * xxt + c * xxt @ xxt) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices only.

    Per step: ``buf = m*buf + g``; Nesterov ``g = g + m*buf``;
    ``u = NS(g) * max(1, rows/cols)^0.5``; ``p -= lr * u``. No weight decay. Set
    ``group["momentum"]`` each step to warm it up (see :func:`muon_momentum`).
    """

    def __init__(
        self,
        params,
        lr: float = 0.04,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
    ):
        params = list(params)
        for p in params:
            tensors = p["params"] if isinstance(p, dict) else [p]
            if any(t.ndim != 2 for t in tensors):
                raise ValueError("Muon only handles 2-D weight matrices; give the rest to Adam")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """Under torch.distributed (gradients already averaged over ranks) rank r runs the
        Newton-Schulz iteration of every world_size-th matrix only, and one all-reduce shares
        the updates, as the parameter-golf baseline's Muon does; every rank keeps every momentum
        buffer (cheap), so any rank's state is the whole optimizer's."""
        import torch.distributed as dist

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        me = dist.get_rank() if world > 1 else 0
        for group in self.param_groups:
            m = group["momentum"]
            params = [p for p in group["params"] if p.grad is not None]
            shared = (torch.zeros(sum(p.numel() for p in params), dtype=torch.float32,
                                  device=params[0].device) if world > 1 and params else None)
            offset = 0
            for i, p in enumerate(params):
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.mul_(m).add_(g)
                if group["nesterov"]:
                    g = g.add(buf, alpha=m)
                if shared is None or i % world == me:
                    update = newton_schulz(g, steps=group["ns_steps"])
                    update = update * max(1.0, p.size(0) / p.size(1)) ** 0.5
                    if shared is None:
                        p.add_(update.to(p.dtype), alpha=-group["lr"])
                    else:  # bf16 -> fp32 is exact: every rank applies the owner's update
                        shared[offset:offset + p.numel()] = update.reshape(-1).float()
                offset += p.numel()
            if shared is not None:
                dist.all_reduce(shared)  # each entry is one rank's value plus zeros: exact
                offset = 0
                for p in params:
                    update = shared[offset:offset + p.numel()].view_as(p)
                    p.add_(update.to(p.dtype), alpha=-group["lr"])
                    offset += p.numel()
        return loss


def muon_momentum(
    step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 500
) -> float:
    """Muon momentum at ``step``: linear from ``start`` to ``end`` over ``warmup_steps``.

    Low momentum early keeps the first, large and noisy gradients from dominating the buffer.
    """
    if warmup_steps <= 0:
        return end
    frac = min(max(step, 0) / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_schedule(
    optimizers: list[torch.optim.Optimizer], cfg: OptimConfig, step: int, lr_mult: float
) -> None:
    """Apply one step's schedule: lr = base_lr * lr_mult everywhere, Muon momentum warm-up."""
    m = muon_momentum(step, cfg.muon_momentum_start, cfg.muon_momentum, cfg.muon_momentum_warmup)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_mult
            if isinstance(opt, Muon):
                group["momentum"] = m


def _group(name: str, params: list[nn.Parameter], lr: float, **extra) -> dict:
    return dict(name=name, params=params, lr=lr, base_lr=lr, **extra)


def adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """The one AdamW construction (lmkit's and the bench references'): the fused kernel on CUDA
    and CPU (on a 2-core CPU 1.5x faster than the per-parameter loop, and foreach was slower
    still), PyTorch's default elsewhere."""
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=_fusable(p for g in groups for p in g["params"]))


def _fusable(params) -> bool | None:
    """True where PyTorch has fused Adam kernels for every parameter (CUDA, CPU)."""
    return all(p.device.type in ("cuda", "cpu") for p in params) or None


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """Optimizers for ``model`` (a :class:`~lmkit.core.trunk.Transformer`), per ``cfg.name``.

    Build them after moving the model to its device (fused Adam is chosen on CUDA and CPU). A
    ``torch.compile``-d model is unwrapped. Empty groups are left out.
    """
    model = getattr(model, "_orig_mod", model)
    if not hasattr(model, "param_groups"):
        raise TypeError("build_optimizers needs a model with param_groups() (lmkit Transformer)")
    roles: dict[str, list[nn.Parameter]] = model.param_groups()
    betas = (cfg.beta1, cfg.beta2)
    fused = _fusable(model.parameters())

    if cfg.name == "adamw":
        big = roles["matrix"] + roles["embed"] + roles["head"]
        big += [p for p in roles["cond"] + roles["objective"] if p.ndim >= 2]
        taken = {id(p) for p in big}
        small = [p for ps in roles.values() for p in ps if id(p) not in taken]
        groups = [
            _group("decay", big, cfg.lr, weight_decay=cfg.weight_decay),
            _group("no_decay", small, cfg.lr, weight_decay=0.0),
        ]
        return [adamw([g for g in groups if g["params"]], cfg)]

    if cfg.name == "muon":
        muon = Muon(
            [_group("matrix", roles["matrix"], cfg.matrix_lr)],
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
        )
        own = roles["objective"]
        groups = [
            _group("embed", roles["embed"], cfg.embed_lr),
            _group("head", roles["head"] + [p for p in own if p.ndim >= 2], cfg.head_lr),
            _group("scalar", roles["scalar"] + roles["cond"] + [p for p in own if p.ndim < 2],
                   cfg.scalar_lr),
        ]
        groups = [g for g in groups if g["params"]]
        adam = torch.optim.Adam(groups, betas=betas, eps=cfg.eps, weight_decay=0.0, fused=fused)
        return [muon, adam]

    known = ", ".join(OPTIMIZERS)
    raise LmkitError(f"optimizer name {cfg.name!r} is not known: set optim.name to one of {known}")
