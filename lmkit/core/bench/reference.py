"""Two plain training references for ``lmkit bench train``, written from first principles.

* :class:`BaselineGPT`: the parameter-golf baseline's layers (``train_gpt.py``: tied embedding,
  weightless RMSNorm, GQA attention with q/k RMSNorm, RoPE and a per-head q gain, ReLU² MLP,
  per-channel block scales, the x0 residual mix, U-Net skips, logit softcap), written as plainly
  as possible with no switches: the same architecture and parameter count as lmkit's trunk with
  the ``small`` preset's options, so any speed gap is lmkit's overhead.
* :class:`PlainGPT`: a minimal GPT-2-style stack (learned positions, LayerNorm, causal MHA with
  biases, GELU MLP 4x, tied head) at the same width, depth, vocabulary and sequence length: the
  script one would otherwise write.

Both return the mean next-token cross-entropy from ``forward(inputs, targets)``, like the
scripts they stand for, and report their own model FLOPs per token (:func:`model_flops_per_token`,
the nanoGPT/PaLM convention lmkit's :func:`~lmkit.core.trunk.flops_per_token` uses).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def rms(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class BaselineBlock(nn.Module):
    def __init__(self, d: int, n_head: int, n_kv_head: int, mlp_mult: float, q_gain: float):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d // n_head
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(d, n_kv_head * self.head_dim, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, int(mlp_mult * d), bias=False)
        self.mlp_out = nn.Linear(int(mlp_mult * d), d, bias=False)
        nn.init.zeros_(self.attn_out.weight)
        nn.init.zeros_(self.mlp_out.weight)
        self.q_gain = nn.Parameter(torch.full((n_head,), q_gain))
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        B, T, d = x.shape
        x = self.resid_mix[0] * x + self.resid_mix[1] * x0
        h = rms(x)
        q = self.q(h).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(h).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v(h).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = rope(rms(q), cos, sin), rope(rms(k), cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.n_kv_head != self.n_head)
        x = x + self.attn_scale * self.attn_out(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_scale * self.mlp_out(F.relu(self.fc(rms(x))).square())


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class BaselineGPT(nn.Module):
    """The parameter-golf baseline GPT; ``small``: 4 layers, d=256, 4/2 heads, 2,101,776 params."""

    def __init__(self, vocab: int, n_layer: int, d: int, n_head: int, n_kv_head: int,
                 seq_len: int, mlp_mult: float = 2.0, q_gain: float = 1.5,
                 softcap: float = 30.0, rope_base: float = 10000.0, embed_std: float = 0.005):
        super().__init__()
        self.softcap = softcap
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=embed_std)
        self.blocks = nn.ModuleList(BaselineBlock(d, n_head, n_kv_head, mlp_mult, q_gain)
                                    for _ in range(n_layer))
        self.n_enc = n_layer // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, n_layer - self.n_enc), d))
        hd = d // n_head
        inv_freq = rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        T = inputs.size(1)
        cos, sin = self.cos[:T], self.sin[:T]
        x = x0 = rms(self.embed(inputs))
        skips = []
        for i, block in enumerate(self.blocks):
            if i >= self.n_enc and skips:
                x = x + self.skip_weights[i - self.n_enc] * skips.pop()
            x = block(x, x0, cos, sin)
            if i < self.n_enc:
                skips.append(x)
        z = F.linear(rms(x), self.embed.weight)
        logits = self.softcap * torch.tanh(z / self.softcap)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: all but the embedding lookup, plus
        the tied head (the same table, used as a matmul)."""
        return sum(p.numel() for p in self.parameters())


class PlainBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.mlp_out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(B, T, d))
        return x + self.mlp_out(F.gelu(self.fc(self.ln2(x))))


class PlainGPT(nn.Module):
    """GPT-2 style: token + learned position embeddings, pre-LayerNorm blocks, tied head."""

    def __init__(self, vocab: int, n_layer: int, d: int, n_head: int, seq_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(PlainBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        for p in self.parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        pos = torch.arange(inputs.size(1), device=inputs.device)
        x = self.wte(inputs) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def matmul_params(self) -> int:
        """All parameters but the position table (a lookup); the token table counts once, as
        the tied head's matmul."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()


def model_flops_per_token(model: BaselineGPT | PlainGPT, n_layer: int, d: int,
                          seq_len: int) -> float:
    """Training FLOPs per token: 6 per matmul parameter plus ``12 * n_layer * d * seq_len`` for
    attention (nanoGPT/PaLM, not halved for the causal mask)."""
    return 6.0 * model.matmul_params() + 12.0 * n_layer * d * seq_len
