"""The shared transformer trunk: one readable model under every objective.

It is the parameter-golf baseline (``train_gpt.py``) with switches, so that AR, masked diffusion and
anything else differ only in their objective, never in the network: causal or bidirectional
attention, optional AdaLN conditioning on a per-sequence scalar (sigma or t), tied or untied head,
and extra embedding rows for special ids (MASK, PAD) that the model reads but never predicts.

Initialisation (the baseline's where it has one):
* tied embedding ~ N(0, ``embed_init_std``); an untied embedding keeps PyTorch's N(0, 1)
  (it is RMS-normalised at once, so only its scale relative to the learning rate matters);
* attention/MLP input matrices and the time MLP keep PyTorch's Linear init, U(+-1/sqrt(fan_in));
* attention and MLP output projections, the untied head and every AdaLN layer start at zero, so each
  block starts as the identity and a time-conditioned model starts equal to an unconditioned one.

With ``n_kv_head=n_head, mlp_mult=3, q_gain_init=0, unet_skips/x0_mix/block_scales/tie_embeddings
off, logit_softcap=0, causal=False, time_cond=True`` and 11 layers this is exactly the 32,987,776
parameter trunk of the parameter-golf MDLM submissions (#1106/#1241): AdaLN on RMS-normed block
inputs from a 128-wide sigma embedding, an untied head over the padded vocabulary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lmkit.core.kernels import (
    apply_rotary,
    causal_attention,
    emulated_bf16,
    linear,
    recording,
    relu2,
    rms_norm,
    softcap_nats,
)
from lmkit.errors import LmkitError


@dataclass
class ModelConfig:
    """Trunk hyper-parameters; the defaults are the parameter-golf baseline (17,059,912 params)."""

    n_layer: int = 9
    d_model: int = 512
    n_head: int = 8
    n_kv_head: int = 4  # GQA; == n_head for plain MHA
    mlp_mult: float = 2.0  # hidden = int(mlp_mult * d_model)
    activation: str = "relu2"  # "relu2" | "gelu"
    rope_base: float = 10000.0
    qk_norm: bool = True  # weightless RMSNorm on q and k (before RoPE)
    q_gain_init: float = 1.5  # learnable per-head q gain (0 = disabled, no parameter)
    unet_skips: bool = True  # first half pushes, second half pops with learned weights
    x0_mix: bool = True  # per-block learned mix of the residual x and the first embedding x0
    block_scales: bool = True  # per-block learned attn_scale / mlp_scale vectors (ones init)
    tie_embeddings: bool = True
    embed_init_std: float = 0.005  # tied embedding init std
    logit_softcap: float = 30.0  # 0 = off; else softcap*tanh(z/softcap)
    causal: bool = True  # False = bidirectional
    time_cond: bool = False  # AdaLN conditioning on a per-sequence scalar (e.g. sigma or t)
    cond_dim: int = 128  # width of the time embedding (its MLP's hidden layer is 4x wider)


ACTIVATIONS = ("relu2", "gelu")


def check_config(cfg: ModelConfig, vocab_size: int, n_special: int = 0) -> None:
    """Fail early, naming the option, instead of deep inside a matmul."""

    def bad(option: str, why: str) -> LmkitError:
        return LmkitError(f"model option {option} is invalid: {why}")

    if cfg.n_layer < 1:
        raise bad("n_layer", f"got {cfg.n_layer}; use at least 1 layer")
    if cfg.n_head < 1 or cfg.d_model % cfg.n_head:
        raise bad("n_head", f"d_model={cfg.d_model} must be a multiple of n_head={cfg.n_head}")
    if (cfg.d_model // cfg.n_head) % 2:
        raise bad("d_model", "the head size d_model/n_head must be even for RoPE")
    if cfg.n_kv_head < 1 or cfg.n_head % cfg.n_kv_head:
        raise bad("n_kv_head", f"n_head={cfg.n_head} must be a multiple of {cfg.n_kv_head}")
    if cfg.activation not in ACTIVATIONS:
        raise bad("activation", f"got {cfg.activation!r}; use one of {', '.join(ACTIVATIONS)}")
    if int(cfg.mlp_mult * cfg.d_model) < 1:
        raise bad("mlp_mult", f"got {cfg.mlp_mult}; the MLP needs a positive hidden width")
    if cfg.logit_softcap < 0:
        raise bad("logit_softcap", f"got {cfg.logit_softcap}; use 0 (off) or a positive cap")
    if cfg.time_cond and cfg.cond_dim < 1:
        raise bad("cond_dim", f"got {cfg.cond_dim}; time conditioning needs a positive width")
    if vocab_size < 1 or n_special < 0:
        raise LmkitError(
            f"vocab_size={vocab_size}, n_special={n_special} is invalid: "
            "check the tokenizer and the objective's special tokens"
        )


def norm(x: Tensor) -> Tensor:
    """Weightless RMSNorm: the baseline keeps no norm gains (fewer bytes, no loss in quality)."""
    return rms_norm(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN: a per-sequence affine map of the normalised activations ([B, d] over [B, T, d])."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Linear(nn.Linear):
    """``nn.Linear`` through :func:`~lmkit.core.kernels.linear` (the same parameters and state
    dict; bf16 autocast on a CPU without bf16 instructions takes a float32 GEMM)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def zero_linear(d_in: int, d_out: int, bias: bool = False) -> Linear:
    """A Linear that starts at zero, so the branch it closes starts switched off."""
    layer = Linear(d_in, d_out, bias=bias)
    nn.init.zeros_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class Rotary(nn.Module):
    """RoPE cos/sin tables, shared by all layers; they grow if a longer sequence shows up."""

    def __init__(self, head_dim: int, base: float, seq_len: int):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(seq_len)

    def _build(self, seq_len: int) -> None:
        # ordinary tensors even when evaluation grows them under inference mode, so that
        # training can still use them afterwards
        with torch.inference_mode(False):
            t = torch.arange(seq_len, dtype=torch.float32, device=self.inv_freq.device)
            freqs = torch.outer(t, self.inv_freq.float())
            self.cos, self.sin = freqs.cos(), freqs.sin()

    def forward(self, T: int) -> tuple[Tensor, Tensor]:
        if T > self.cos.size(0):  # a shape check: static under torch.compile
            self._build(max(T, 2 * self.cos.size(0)))
        return self.cos[:T], self.sin[:T]


class KVCache:
    """Keys and values of every layer for the positions decoded so far (causal inference only).

    Only per-layer K/V are kept: the residual stream (x0 mix, U-Net skips) of a new token depends
    on earlier tokens only through attention, so it is recomputed for the new tokens alone.
    Buffers are allocated on first use with the dtype K/V arrive in (bf16 under autocast).
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0  # positions already stored (the next token's position)
        self.k: list[Tensor] = []
        self.v: list[Tensor] = []

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` ([B, H_kv, T, hd]) at ``pos`` and return all keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise LmkitError(f"the KV cache holds {self.max_len} positions, {end} were asked "
                             "for: build it with a larger max_len")
        if layer == len(self.k):
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k.append(k.new_empty(shape))
            self.v.append(v.new_empty(shape))
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Bias-free GQA self-attention through SDPA (flash attention on CUDA), causal attention
    through :func:`~lmkit.core.kernels.causal_attention` (bf16 GEMMs on CPUs with bf16)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = d // cfg.n_head
        self.causal, self.qk_norm = cfg.causal, cfg.qk_norm
        self.q = Linear(d, d, bias=False)
        self.k = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.v = Linear(d, self.n_kv_head * self.head_dim, bias=False)
        self.proj = zero_linear(d, d)
        if cfg.q_gain_init:
            self.q_gain = nn.Parameter(torch.full((cfg.n_head,), float(cfg.q_gain_init)))
        else:
            self.register_parameter("q_gain", None)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                cache: KVCache | None = None, layer: int = 0,
                same_segment: Tensor | None = None) -> Tensor:
        B, T, d = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm:  # before the transpose, while each head's row is contiguous
            q, k = norm(q), norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.q_gain is not None:
            q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        mask, causal = None, self.causal
        if cache is not None:  # queries sit at cache.pos.., keys run from position 0
            k, v = cache.update(layer, k, v)
            if cache.pos and T > 1:  # a chunk after a prefix: causal, offset by cache.pos
                mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device)
                mask = mask.tril(diagonal=cache.pos)
            causal = causal and cache.pos == 0 and T > 1
        if same_segment is not None:  # packed documents: attend within one's own document
            mask = same_segment.tril() if causal else same_segment
            causal = False
        if causal and mask is None:
            y = causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_head != self.n_head
            )
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.d_model)
        self.activation = cfg.activation
        self.fc = Linear(cfg.d_model, hidden, bias=False)
        self.proj = zero_linear(hidden, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = relu2(h, inplace=True) if self.activation == "relu2" else F.gelu(h)
        return self.proj(h)


class Block(nn.Module):
    """x0-mix, then pre-norm attention and MLP, each scaled by a learned per-channel vector."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)
        if cfg.block_scales:
            self.attn_scale = nn.Parameter(torch.ones(d))
            self.mlp_scale = nn.Parameter(torch.ones(d))
        else:
            self.register_parameter("attn_scale", None)
            self.register_parameter("mlp_scale", None)
        if cfg.x0_mix:  # row 0 weighs the residual, row 1 the first embedding x0
            self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        else:
            self.register_parameter("resid_mix", None)
        # AdaLN: shift/scale for the attention and MLP inputs, from the time embedding.
        self.adaln = zero_linear(cfg.cond_dim, 4 * d, bias=True) if cfg.time_cond else None

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, c: Tensor | None,
                cache: KVCache | None = None, layer: int = 0,
                same_segment: Tensor | None = None) -> Tensor:
        if self.resid_mix is not None:  # fused multiply-adds: one pass each, not two
            x = torch.addcmul(self.resid_mix[1] * x0, self.resid_mix[0], x)
        h_attn = norm(x)
        if self.adaln is not None:
            shift_a, scale_a, shift_m, scale_m = self.adaln(c).chunk(4, dim=-1)
            h_attn = modulate(h_attn, shift_a, scale_a)
        a = self.attn(h_attn, cos, sin, cache, layer, same_segment)
        x = x + a if self.attn_scale is None else torch.addcmul(x, self.attn_scale, a)
        h_mlp = norm(x)
        if self.adaln is not None:
            h_mlp = modulate(h_mlp, shift_m, scale_m)
        m = self.mlp(h_mlp)
        return x + m if self.mlp_scale is None else torch.addcmul(x, self.mlp_scale, m)


class TimeEmbedding(nn.Module):
    """Per-sequence scalar -> ``cond_dim`` sinusoidal features -> SiLU MLP (4x hidden) -> SiLU."""

    def __init__(self, cond_dim: int, max_period: float = 1e4):
        super().__init__()
        half = cond_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.fc1 = Linear(2 * half, 4 * cond_dim)
        self.fc2 = Linear(4 * cond_dim, cond_dim)

    def forward(self, cond: Tensor) -> Tensor:
        args = cond.float()[:, None] * self.freqs[None, :]
        emb = torch.cat((args.cos(), args.sin()), dim=-1)
        return F.silu(self.fc2(F.silu(self.fc1(emb))))


@functools.cache
def _compiled_block_call():  # noqa: ANN202  (a torch.compile-d callable)
    """One compiled ``block(*args)`` for every block of every model: regional compilation, so
    one graph (per block configuration) is traced once and serves all layers."""
    return torch.compile(lambda block, *args: block(*args))


def padded_vocab_size(vocab_size: int, n_special: int = 0) -> int:
    """Embedding rows: tokens plus special ids, rounded up to 64 for tidy matmul shapes."""
    return math.ceil((vocab_size + n_special) / 64) * 64


class Transformer(nn.Module):
    """The trunk: ``forward(idx, cond=None) -> logits [B, T, vocab_size]`` in float32.

    Causal decoding passes ``cache=model.new_cache(max_len)``: ``idx`` then holds only the new
    tokens, which sit at positions ``cache.pos..`` (the cache advances by ``idx.size(1)``).
    Ids ``vocab_size, vocab_size+1, ...`` (up to ``n_special`` of them) are special tokens such as
    MASK or PAD: they have embedding rows but no output logits, so the model never predicts them.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_special: int = 0,
                 context: int = 1024):
        """``context``: positions the RoPE tables start with (the run's ``train.seq_len``);
        they grow if a longer sequence shows up, with the same values."""
        super().__init__()
        check_config(cfg, vocab_size, n_special)
        self.cfg = cfg
        self.vocab_size, self.n_special = vocab_size, n_special
        self.padded_vocab = padded_vocab_size(vocab_size, n_special)
        d = cfg.d_model

        self.embed = nn.Embedding(self.padded_vocab, d)
        self.time_embed = TimeEmbedding(cfg.cond_dim) if cfg.time_cond else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.n_enc = cfg.n_layer // 2 if cfg.unet_skips else 0
        n_skip = min(self.n_enc, cfg.n_layer - self.n_enc)
        if n_skip:
            self.skip_weights = nn.Parameter(torch.ones(n_skip, d))
        else:
            self.n_enc = 0
            self.register_parameter("skip_weights", None)
        # An untied head has a row per embedding row (padded); logits are sliced to vocab_size.
        self.head = None if cfg.tie_embeddings else zero_linear(d, self.padded_vocab)
        self.rotary = Rotary(d // cfg.n_head, cfg.rope_base, context)
        # Trainable modules an objective declares (extra heads, a learned schedule, ...): part of
        # the model, so they are counted, optimized, checkpointed and packed with it.
        self.objective_modules = nn.ModuleDict()
        # train.compile: training steps run the blocks torch.compile-d (see compile_training)
        self.compiled_training = False
        if cfg.tie_embeddings:
            nn.init.normal_(self.embed.weight, mean=0.0, std=cfg.embed_init_std)

    def forward_hidden(self, idx: Tensor, cond: Tensor | None = None,
                       cache: KVCache | None = None, segments: Tensor | None = None) -> Tensor:
        """Final normalised hidden states [B, T, d] (for objectives that want their own head).

        ``segments`` [B, T] (e.g. the document of each position in a packed row): a position
        attends only to positions of its own segment, so one row holds several documents.
        """
        c = self._condition(idx, cond)
        x = x0 = norm(self.embed(idx))
        start = 0
        same = None
        if segments is not None:
            if segments.shape != idx.shape:
                raise LmkitError(f"segments {tuple(segments.shape)} must match the input "
                                 f"{tuple(idx.shape)}")
            same = (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)
        if cache is not None:
            if same is not None:
                raise LmkitError("segments cannot be combined with a KV cache")
            self._require_causal()
            start = cache.pos
        cos, sin = self.rotary(start + idx.size(1))
        cos, sin = cos[start:], sin[start:]
        compiled = (_compiled_block_call() if self.compiled_training and self.training
                    and torch.is_grad_enabled() and cache is None
                    and not emulated_bf16(idx.device) else None)

        def run(block: Block, i: int, x: Tensor) -> Tensor:
            if compiled is not None:  # no layer index: an int argument would recompile per layer
                return compiled(block, x, x0, cos, sin, c, None, 0, same)
            return block(x, x0, cos, sin, c, cache, i, same)

        skips = []
        for i, block in enumerate(self.blocks):
            if i < self.n_enc:
                x = run(block, i, x)
                skips.append(x)
                continue
            if skips:  # decoder block j adds the output of encoder block n_enc-1-j
                x = torch.addcmul(x, self.skip_weights[i - self.n_enc], skips.pop())
            x = run(block, i, x)
        if cache is not None:
            cache.pos += idx.size(1)
        return norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """Hidden states -> float32 logits over the real vocabulary, soft-capped.

        The cap's ``1/cap`` scales the [vocab, d] weight rather than the [B, T, vocab] logits:
        one pass over the big tensor fewer, forward and backward. Under inference the logits
        are ``2 cap * sigmoid(2 z / cap) - cap`` in place (the same values to float rounding):
        on CPUs sigmoid is ~5x faster than tanh (0.57 against 2.85 ms for ``small``'s [2048,
        1024] logits with the scaling, AVX-512 EPYC), and no [B, T, vocab] allocations.
        """
        cap = self.cfg.logit_softcap
        if not cap:
            return linear(h, self._head_weight()).float()
        weight = self._head_weight()
        if recording(h) or recording(weight):
            return cap * torch.tanh(linear(h, weight * (1.0 / cap)).float())
        return linear(h, weight * (2.0 / cap)).float().sigmoid_().mul_(2.0 * cap).sub_(cap)

    def token_nats(self, h: Tensor, targets: Tensor) -> Tensor:
        """−log p(target) in nats (float32, the shape of ``targets``) from hidden states
        [..., d]: the head and the cross-entropy in one, for losses that need no logits.

        With a soft cap and a gradient to take, :func:`~lmkit.core.kernels.softcap_nats` (the
        same values to float rounding, fewer passes over the [N, vocab] logits and one of them
        kept for the backward instead of two); otherwise ``F.cross_entropy`` of :meth:`logits`.
        """
        cap = self.cfg.logit_softcap
        if cap and recording(h):
            flat = targets.reshape(-1)
            u = linear(h, self._head_weight() * (2.0 / cap)).float()
            nats = softcap_nats(u.reshape(flat.numel(), u.size(-1)), flat, cap)
            return nats.view(targets.shape)
        return logits_nats(self.logits(h), targets)

    def _head_weight(self) -> Tensor:
        """The output matrix's rows for the real vocabulary (the tied embedding or the head)."""
        return (self.embed.weight if self.head is None else self.head.weight)[: self.vocab_size]

    def forward(self, idx: Tensor, cond: Tensor | None = None,
                cache: KVCache | None = None) -> Tensor:
        return self.logits(self.forward_hidden(idx, cond, cache))

    def compile_training(self) -> None:
        """Run the blocks ``torch.compile``-d in training steps (``train.compile``), for every
        objective, whether it calls ``forward`` or ``forward_hidden``. Evaluation, decoding and
        anything under no_grad stay eager: their shapes vary, and recompiling would cost more
        than it saves; so do steps under bf16 autocast on a CPU without bf16 instructions
        (:func:`~lmkit.core.kernels.linear`). The module itself is unchanged (state dict,
        copies, checkpoints)."""
        self.compiled_training = True

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache for decoding up to ``max_len`` positions with this causal model."""
        self._require_causal()
        return KVCache(max_len)

    def _require_causal(self) -> None:
        if not self.cfg.causal:
            raise LmkitError("a KV cache needs a causal model: with bidirectional attention "
                             "every new token changes the keys of all earlier ones")

    def _condition(self, idx: Tensor, cond: Tensor | None) -> Tensor | None:
        """Check ``cond`` against ``time_cond`` and embed it; the checks are on shapes only."""
        if self.time_embed is None:
            if cond is not None:
                raise LmkitError(
                    "a conditioning value (cond) was passed to a model built with time_cond=false: "
                    "set model.time_cond=true or stop passing cond"
                )
            return None
        if cond is None:
            raise LmkitError(
                "this model was built with time_cond=true and needs cond (one value per sequence): "
                "use an objective that conditions on time, or set model.time_cond=false"
            )
        if cond.shape != (idx.size(0),):
            raise LmkitError(
                f"cond must have shape [batch]={[idx.size(0)]}, got {list(cond.shape)}"
            )
        return self.time_embed(cond)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, so optimizers need not guess from names or shapes.

        ``matrix``: attention/MLP weights inside the blocks (Muon's share); ``embed``: the token
        embedding (also the head when tied); ``head``: the untied head; ``cond``: time MLP and
        AdaLN layers; ``objective``: the objective's own modules; ``scalar``: gains, scales,
        mixes, skip weights. Every parameter is in exactly one list.
        """
        groups: dict[str, list[nn.Parameter]] = {
            "matrix": [
                layer.weight
                for b in self.blocks
                for layer in (b.attn.q, b.attn.k, b.attn.v, b.attn.proj, b.mlp.fc, b.mlp.proj)
            ],
            "embed": [self.embed.weight],
            "head": [] if self.head is None else [self.head.weight],
            "cond": [],
            "objective": list(self.objective_modules.parameters()),
        }
        if self.time_embed is not None:
            cond_modules = [self.time_embed] + [b.adaln for b in self.blocks]
            groups["cond"] = [p for m in cond_modules for p in m.parameters()]
        taken = {id(p) for ps in groups.values() for p in ps}
        groups["scalar"] = [p for p in self.parameters() if id(p) not in taken]
        return groups


def head_nats(model: nn.Module, h: Tensor, targets: Tensor) -> Tensor:
    """−log p(targets) (nats, float32) from hidden states through ``model``'s head: the trunk's
    :meth:`Transformer.token_nats`, or for any other model with its ``logits`` surface (a test's
    stand-in, say) the cross-entropy of ``model.logits(h)``."""
    if isinstance(model, Transformer):
        return model.token_nats(h, targets)
    return logits_nats(model.logits(h), targets)


def logits_nats(logits: Tensor, targets: Tensor) -> Tensor:
    """``F.cross_entropy`` per position of logits [..., vocab] (taken as float32), shaped like
    ``targets``."""
    flat = targets.reshape(-1)
    return F.cross_entropy(logits.float().reshape(flat.numel(), logits.size(-1)), flat,
                           reduction="none").view(targets.shape)


def count_params(model: nn.Module) -> int:
    """Number of distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def flops_per_token(
    cfg: ModelConfig, n_params: int, seq_len: int, vocab_size: int, n_special: int = 0
) -> float:
    """Training FLOPs per token (forward + backward), for throughput and MFU figures.

    ``n_params`` is ``count_params(model)``. Matmul parameters are those minus the embedding table
    (a lookup, no FLOPs) with the head counted at its ``vocab_size`` used rows;
    the few vectors/scalars are left in (under 0.2 %, as in nanoGPT). Attention adds
    ``12 * n_layer * d_model * seq_len``: the nanoGPT/PaLM convention, *not* halved for causal
    masks, so numbers compare with published MFU figures.
    """
    d = cfg.d_model
    padded = padded_vocab_size(vocab_size, n_special)
    matmul = n_params - padded * d  # the embedding lookup
    matmul += vocab_size * d - (0 if cfg.tie_embeddings else padded * d)  # the head's used rows
    return 6.0 * matmul + 12.0 * cfg.n_layer * d * seq_len
