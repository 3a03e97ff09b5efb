"""Shared sampling utilities: seeded generators and float64 categorical sampling.

Every draw is a Gumbel-max in float64 by default. Float32 Gumbels are capped near 16.6 (the
largest float32 uniform below 1 is 1 − 2⁻²⁴), so tokens far down the tail are never drawn:
float32 sampling quietly lowers diversity and flatters generative perplexity.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmkit.errors import LmkitError

DEFAULT_DTYPE = torch.float64


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: every random draw of a sampler uses it."""
    return torch.Generator(device=device).manual_seed(int(seed))


def check_filters(temperature: float, top_k: int, top_p: float) -> None:
    """Reject filter settings that would silently mean something else, naming the option."""
    if temperature < 0:
        raise LmkitError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise LmkitError(f"--top-k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise LmkitError(f"--top-p must be in (0, 1] (1 = off), got {top_p}")


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, dtype: torch.dtype = DEFAULT_DTYPE) -> Tensor:
    """Tempered, top-k / top-p filtered log-probabilities over the last axis, in ``dtype``.

    Excluded tokens get −inf. ``temperature=0`` leaves the logits unscaled (the caller takes the
    argmax). Top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p``.
    """
    z = logits.to(dtype)
    if temperature > 0:
        z = z / temperature
    if top_k and top_k < z.size(-1):
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    logp = torch.log_softmax(z, dim=-1)
    if top_p < 1.0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_logp.exp(), dim=-1) - sorted_logp.exp()
        drop_sorted = mass_before >= top_p  # the first token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def gumbel(shape: tuple[int, ...] | torch.Size, generator: torch.Generator,
           dtype: torch.dtype = DEFAULT_DTYPE) -> Tensor:
    """Standard Gumbel noise ``−log(−log u)`` drawn in ``dtype`` on the generator's device."""
    u = torch.rand(shape, generator=generator, device=generator.device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    return -torch.log(-torch.log(u.clamp(min=tiny)))


def sample_categorical(logp: Tensor, generator: torch.Generator, *, greedy: bool = False,
                       dtype: torch.dtype = DEFAULT_DTYPE) -> Tensor:
    """One draw per row of ``logp`` (log-weights, −inf = excluded) by Gumbel-max in ``dtype``.

    The noise is drawn even when ``greedy`` so that the generator advances identically whatever
    the temperature (samplers that must agree draw for draw rely on that).
    """
    noise = gumbel(logp.shape, generator, dtype)
    if greedy:
        return logp.argmax(dim=-1)
    return (logp.to(dtype) + noise).argmax(dim=-1)


def sample_tokens(logits: Tensor, generator: torch.Generator, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0,
                  dtype: torch.dtype = DEFAULT_DTYPE) -> tuple[Tensor, Tensor]:
    """Sample ids from raw logits ``[..., V]``; return ``(ids, log-prob of each id)``.

    The log-probability is under the filtered distribution the id was drawn from (confidence
    samplers rank positions by it).
    """
    logp = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, dtype=dtype)
    ids = sample_categorical(logp, generator, greedy=temperature == 0, dtype=dtype)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
