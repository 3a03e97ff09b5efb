"""Exact bits-per-byte: SentencePiece byte LUTs and a meter that sums nats and bytes.

Bits per byte only compares models across tokenizers and objectives if the byte count is the
UTF-8 length of the text the tokens stand for. The count is taken per target token from three
lookup tables and the previous token:

    bytes(t | p) = base_bytes[t] + (leading_space[t] and not boundary[p])

* control / unknown / unused ids, and every id past the tokenizer's pieces (MASK/PAD rows an
  objective adds), are *boundaries* and count 0 bytes;
* a byte-fallback piece ``<0xNN>`` is one byte (not the 3-4 bytes of the string ``"<0xNN>"``);
* a normal piece starting with ``▁`` has a leading space: the space is one byte, counted only
  when the previous token is not a boundary (SentencePiece drops a document's leading space);
  the rest is its UTF-8 length, with any inner ``▁`` decoding to a 1-byte space.

A tokenizer with no standalone ``▁`` piece (parameter-golf issue #897) byte-falls-back a space
it cannot merge (before digits, symbols) into ``<0xE2><0x96><0x81>``. That triple stands for one
space, not three bytes, and telling it from other ``E2 96 xx`` / ``xx 96 81`` sequences takes
two tokens of context: such a LUT has ``needs_prev2`` and ``target_bytes`` then wants ``prev2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmkit.core.kinds import METRIC_KINDS
from lmkit.errors import LmkitError

if TYPE_CHECKING:
    import sentencepiece as spm

SPACE = "\u2581"  # SentencePiece's escaped whitespace
LN2 = math.log(2.0)


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Convert a summed NLL in nats over some tokens into bits per byte of their text."""
    if total_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {total_bytes}")
    return float(total_nats) / LN2 / float(total_bytes)


def _load_sentencepiece(model: Any) -> tuple[Any, str]:
    """Accept a path or a loaded processor; return (processor, name for error messages)."""
    import sentencepiece as spm

    from lmkit.core.tokenizer import load_processor

    if isinstance(model, spm.SentencePieceProcessor):
        return model, "the given SentencePiece processor"
    return load_processor(Path(model)), str(model)


@dataclass(frozen=True, eq=False)
class ByteLUT:
    """Per-token-id byte tables; pure tensors so it moves to any device and indexes in batch."""

    base_bytes: torch.Tensor  # int64 [size]
    leading_space: torch.Tensor  # bool [size]
    boundary: torch.Tensor  # bool [size]
    # ids of <0xE2>, <0x96>, <0x81> when a space can only be spelled by byte fallback (#897)
    space_fallback: tuple[int, int, int] | None = None

    @classmethod
    def from_sentencepiece(cls, model: str | Path | spm.SentencePieceProcessor,
                           size: int | None = None) -> ByteLUT:
        """Build the LUT; ``size`` pads it so ids past the vocab (MASK, PAD) index safely."""
        sp, name = _load_sentencepiece(model)
        n = sp.get_piece_size()
        size = n if size is None else int(size)
        if size < n:
            raise LmkitError(f"tokenizer {name} has {n} pieces but the model's vocabulary is "
                             f"only {size}; use the tokenizer the data was prepared with")
        base = torch.zeros(size, dtype=torch.int64)
        lead = torch.zeros(size, dtype=torch.bool)
        bound = torch.ones(size, dtype=torch.bool)  # ids >= n stay boundaries with 0 bytes
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            bound[i] = False
            if sp.is_byte(i):
                base[i] = 1
                continue
            piece = sp.id_to_piece(i)
            if piece.startswith(SPACE):
                lead[i] = True
                piece = piece[1:]
            base[i] = len(piece.replace(SPACE, " ").encode("utf-8"))
        return cls(base, lead, bound, _space_fallback_ids(sp))

    @property
    def size(self) -> int:
        return int(self.base_bytes.numel())

    @property
    def needs_prev2(self) -> bool:
        """True when exact counts need the token two back (the tokenizer of issue #897)."""
        return self.space_fallback is not None

    @property
    def device(self) -> torch.device:
        return self.base_bytes.device

    def to(self, device: torch.device | str) -> ByteLUT:
        return ByteLUT(self.base_bytes.to(device), self.leading_space.to(device),
                       self.boundary.to(device), self.space_fallback)

    def target_bytes(self, targets: torch.Tensor, prev: torch.Tensor,
                     prev2: torch.Tensor | None = None) -> torch.Tensor:
        """UTF-8 bytes each target adds to the text, given the token(s) before it.

        ``prev2`` (the token two back; -1 where there is none) is only read, and then required,
        when ``needs_prev2``: the byte-fallback space ``E2 96 81`` is counted as one byte on
        its ``E2``, the ``96`` after ``E2`` counts 0, and whatever follows ``E2 96`` adds the
        pending byte back unless it is the ``81`` that completes the space.
        """
        out = self.base_bytes[targets] + (self.leading_space[targets] & ~self.boundary[prev])
        if self.space_fallback is None:
            return out
        if prev2 is None:
            raise ValueError("this tokenizer spells some spaces as byte-fallback <0xE2><0x96>"
                             "<0x81> (no standalone '▁' piece); pass prev2, the token two back, "
                             "to target_bytes / BpbMeter.add")
        e2, b96, b81 = self.space_fallback
        out = out - ((targets == b96) & (prev == e2)).long()
        after_e2_96 = (prev == b96) & (prev2 == e2)
        pending = 1 - 2 * (targets == b81).long()  # +1: the 96 byte after all; -1: it was a space
        return out + after_e2_96.long() * pending

    def sequence_bytes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Bytes of ``tokens[..., 1:]``, with ``tokens[..., 0]`` (e.g. BOS) as context only."""
        prev2 = None
        if self.needs_prev2:
            pad = torch.full_like(tokens[..., :1], -1)
            prev2 = torch.cat([pad, tokens], dim=-1)[..., :-2]
        return self.target_bytes(tokens[..., 1:], tokens[..., :-1], prev2)


def _space_fallback_ids(sp: Any) -> tuple[int, int, int] | None:
    """The byte ids that spell '▁' when the vocab has no usable standalone '▁' piece."""
    sid = sp.piece_to_id(SPACE)
    usable = sp.id_to_piece(sid) == SPACE and not (
        sp.is_control(sid) or sp.is_unknown(sid) or sp.is_unused(sid))
    if usable:
        return None
    ids = tuple(sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode("utf-8"))
    if not all(sp.is_byte(i) for i in ids):
        return None  # no byte fallback: spaces become <unk>, a boundary; nothing to correct
    return ids  # type: ignore[return-value]


@dataclass
class Metric:
    """One entry of ``lmkit eval --json``'s ``metrics``: a value and what it was computed over."""

    name: str
    kind: str  # one of METRIC_KINDS
    value: float
    unit: str  # "bpb" for bits per byte
    stderr: float | None  # None where exact
    tokens: int  # tokens the value was computed over
    bytes: int  # LUT bytes of exactly those tokens
    detail: dict = field(default_factory=dict)  # estimator, steps, samples, stride...
    # independent units of a Monte-Carlo estimate, nats [units, replicates] (not in the JSON):
    # two runs scored with the same draws pair unit by unit, for the stderr of their difference
    units: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        if self.kind == "exact" and self.stderr is not None:
            raise ValueError(f"metric {self.name!r}: an exact value has no stderr")
        if not math.isfinite(self.value) and self.kind != "score":
            # A NaN or infinite figure is no code length and no bound: never label it one.
            self.detail = {**self.detail, "claimed_kind": self.kind,
                           "non_finite": f"the value is {self.value!r}: the model's outputs "
                                         "are not finite (a diverged run or overflow)"}
            self.kind = "score"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "value": self.value, "unit": self.unit,
                "stderr": self.stderr, "tokens": self.tokens, "bytes": self.bytes,
                "detail": dict(self.detail)}

    @classmethod
    def from_dict(cls, d: dict) -> Metric:
        """Read a metric back from JSON; unknown extra keys (newer writers) are ignored."""
        keys = ("name", "kind", "value", "unit", "stderr", "tokens", "bytes")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"metric record is missing {', '.join(missing)}: {d!r}")
        stderr = None if d["stderr"] is None else float(d["stderr"])
        value = math.nan if d["value"] is None else float(d["value"])  # strict JSON: null
        return cls(str(d["name"]), str(d["kind"]), value, str(d["unit"]), stderr,
                   int(d["tokens"]), int(d["bytes"]), dict(d.get("detail") or {}))


def metric_unit(kind: str) -> str:
    """``bpb`` for likelihoods and bounds; ``score`` for a score, which is not bits per byte."""
    return "score" if kind == "score" else "bpb"


def _check_kind(kind: str) -> None:
    if kind not in METRIC_KINDS:
        raise ValueError(f"metric kind must be one of {', '.join(METRIC_KINDS)}, got {kind!r}")


class BpbMeter:
    """Accumulates nats and exact LUT bytes over exactly the scored tokens, then reports bpb.

    Sums stay float64/int64 tensors on the data's device so ``add`` never syncs the GPU;
    ``metric()`` reads them once. Under torchrun, an objective that takes its share of the work
    from :meth:`shard` adds only that share, and ``metric()`` all-reduces the sums in float64;
    a meter never sharded holds the whole evaluation on every rank and is not reduced.
    """

    def __init__(self, lut: ByteLUT, name: str, kind: str, detail: dict | None = None,
                 stream: torch.Tensor | None = None):
        _check_kind(kind)
        self.lut, self.name, self.kind = lut, name, kind
        self.detail = dict(detail or {})
        self.stream = stream  # the validation stream positions refer to (ctx.val_tokens)
        self._sums: torch.Tensor | None = None  # float64 [nats, var]
        self._counts: torch.Tensor | None = None  # int64 [bytes, tokens, estimate calls]
        self._hits: torch.Tensor | None = None  # times each stream position was scored
        self._outside: torch.Tensor | None = None  # positions that are not targets
        self.sharded = False  # each rank adds its share: totals are summed over ranks

    def shard(self, n: int, batch: int = 1) -> range:
        """This rank's contiguous share of ``n`` work items (windows, rows; all of them in one
        process), in whole batches of ``batch`` as one process would batch them; the meter then
        sums its totals over ranks."""
        from lmkit.core import distributed

        self.sharded = True
        return distributed.shard(n, batch)

    def _accumulators(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._sums is None or self._counts is None:
            self._sums = torch.zeros(2, dtype=torch.float64, device=device)
            self._counts = torch.zeros(3, dtype=torch.int64, device=device)
        return self._sums, self._counts

    def _lut_on(self, device: torch.device) -> ByteLUT:
        if self.lut.device != device:
            self.lut = self.lut.to(device)  # cached: moved once, not per call
        return self.lut

    def add(self, nats: torch.Tensor, targets: torch.Tensor, prev: torch.Tensor,
            mask: torch.Tensor | None = None, prev2: torch.Tensor | None = None) -> None:
        """Add exact per-position NLLs (nats) of ``targets``; ``mask`` picks the scored positions.

        Deprecated in favour of :meth:`add_positions` (the caller no longer handles the
        predecessors the byte count needs); kept working for existing plugins. Unscored
        positions may hold anything (ignore-index ids, inf nats): they are replaced before
        indexing or summing.
        """
        if nats.shape != targets.shape or prev.shape != targets.shape:
            raise ValueError(f"nats {tuple(nats.shape)}, targets {tuple(targets.shape)} and "
                             f"prev {tuple(prev.shape)} must have the same shape")
        lut = self._lut_on(targets.device)
        sums, counts = self._accumulators(targets.device)
        if mask is None:
            nbytes = lut.target_bytes(targets, prev, prev2)
            sums[0] += nats.double().sum()
            counts[0] += nbytes.sum()
            counts[1] += targets.numel()
            return
        mask = mask.to(torch.bool)
        zero = torch.zeros((), dtype=targets.dtype, device=targets.device)
        targets, prev = torch.where(mask, targets, zero), torch.where(mask, prev, zero)
        nbytes = lut.target_bytes(targets, prev, prev2)
        sums[0] += torch.where(mask, nats.double(), 0.0).sum()
        counts[0] += torch.where(mask, nbytes, 0).sum()
        counts[1] += mask.sum()

    # -- by position: core derives targets, predecessors and bytes (the recommended API) -----
    def _targets_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(LUT bytes of each target at ``positions`` (0 where -1), scored mask). Positions must
        be targets of the stream (1 <= p < len), each scored once: checked in :meth:`totals`
        from counters, so adding never syncs the GPU."""
        if self.stream is None:
            raise ValueError(f"meter {self.name!r} has no stream; make it with ctx.meter")
        positions = positions.long()
        dev, n = positions.device, self.stream.numel()
        if self._hits is None:
            self._hits = torch.zeros(n, dtype=torch.int64, device=dev)
            self._outside = torch.zeros((), dtype=torch.int64, device=dev)
            self._stream = self.stream.to(dev)
        scored = positions >= 0
        self._outside += (scored & (positions >= n)).sum() + (positions == 0).sum()
        safe = torch.where(scored, positions.clamp(1, n - 1), torch.ones_like(positions))
        self._hits.index_add_(0, safe.flatten(), scored.flatten().long())
        stream = self._stream
        prev2 = torch.where(safe >= 2, stream[(safe - 2).clamp(min=0)], torch.full_like(safe, -1))
        nbytes = self._lut_on(dev).target_bytes(stream[safe], stream[safe - 1], prev2)
        return torch.where(scored, nbytes, torch.zeros_like(nbytes)), scored

    def add_positions(self, positions: torch.Tensor, nats: torch.Tensor) -> None:
        """Add exact NLLs (nats) of the targets at ``positions``: indices into the validation
        stream (``ctx.val_tokens``), -1 where nothing is scored. Core reads the targets, their
        predecessors and their exact LUT bytes from the stream itself."""
        if positions.shape != nats.shape:
            raise ValueError(f"positions {tuple(positions.shape)} and nats "
                             f"{tuple(nats.shape)} must have the same shape")
        nbytes, scored = self._targets_at(positions)
        sums, counts = self._accumulators(positions.device)
        sums[0] += torch.where(scored, nats.double(), 0.0).sum()
        counts[0] += nbytes.sum()
        counts[1] += scored.sum()

    def add_estimate_positions(self, positions: torch.Tensor, nats: torch.Tensor,
                               var: torch.Tensor) -> None:
        """Add Monte-Carlo estimates per unit (e.g. a sequence): ``positions`` ``[U, P]`` are
        the stream positions each unit's estimate covers (-1 padding), ``nats`` ``[U]`` the
        estimate and ``var`` ``[U]`` its variance. Bytes and tokens come from the positions."""
        if self.kind == "exact":
            raise ValueError(f"meter {self.name!r} is kind 'exact'; a Monte-Carlo estimate "
                             "makes it an 'upper_bound' or a 'score'")
        if positions.dim() != 2 or nats.shape != (positions.size(0),) or var.shape != nats.shape:
            raise ValueError(f"positions must be [units, P] and nats, var [units]; got "
                             f"{tuple(positions.shape)}, {tuple(nats.shape)}, {tuple(var.shape)}")
        nbytes, scored = self._targets_at(positions)
        sums, counts = self._accumulators(positions.device)
        sums[0] += nats.double().sum()
        sums[1] += var.double().sum()
        counts[0] += nbytes.sum()
        counts[1] += scored.sum()
        counts[2] += 1

    # -- by token values (older API: the caller supplies targets and predecessors) -------------
    def add_estimate(self, nats: torch.Tensor, var: torch.Tensor, bytes: torch.Tensor,
                     tokens: torch.Tensor) -> None:
        """Add Monte-Carlo estimates: per unit (e.g. sequence) nats, the variance of that
        estimate, and the unit's LUT bytes and token count (from ``lut.target_bytes``).

        Deprecated in favour of :meth:`add_estimate_positions` (bytes derived by core); kept
        working for existing plugins."""
        if self.kind == "exact":
            raise ValueError(f"meter {self.name!r} is kind 'exact'; a Monte-Carlo estimate "
                             "makes it an 'upper_bound' or a 'score'")
        sums, counts = self._accumulators(nats.device)
        sums[0] += nats.double().sum()
        sums[1] += var.double().sum()
        counts[0] += bytes.to(counts.device).long().sum()
        counts[1] += tokens.to(counts.device).long().sum()
        counts[2] += 1

    def _check_positions(self) -> None:
        if self._hits is None or self._outside is None:
            return
        n = self._hits.numel()
        if int(self._outside) > 0:
            raise ValueError(f"meter {self.name!r} was given positions that are not targets of "
                             f"the {n}-token stream (targets are 1..{n - 1}; -1 = unscored)")
        twice = int((self._hits > 1).sum())
        if twice:
            first = int((self._hits > 1).nonzero()[0])
            raise ValueError(f"meter {self.name!r} scored {twice} stream position(s) more than "
                             f"once (first: {first}); each target counts once per metric")

    def totals(self) -> tuple[float, float | None, int, int]:
        """(nats, variance or None if nothing was estimated, bytes, tokens), over all ranks."""
        self._check_positions()
        if self._sums is None or self._counts is None:
            sums = torch.zeros(2, dtype=torch.float64, device=_dist_device())
            counts = torch.zeros(3, dtype=torch.int64, device=sums.device)
        else:
            sums, counts = self._sums.clone(), self._counts.clone()
        if self.sharded and _distributed():
            import torch.distributed as dist

            dist.all_reduce(sums)
            dist.all_reduce(counts)
        s, c = sums.tolist(), counts.tolist()
        return s[0], (s[1] if c[2] > 0 else None), int(c[0]), int(c[1])

    def metric(self) -> Metric:
        """The bpb metric; an estimate carries stderr = sqrt(sum var) / ln 2 / bytes."""
        nats, var, nbytes, ntokens = self.totals()
        if nbytes <= 0:
            raise ValueError(f"meter {self.name!r} scored {ntokens} tokens with 0 bytes; "
                             "nothing was added or every target was a boundary")
        stderr = None if var is None else math.sqrt(max(var, 0.0)) / LN2 / nbytes
        # a score is computed like bpb but is not bits per byte: it carries no bpb unit
        return Metric(self.name, self.kind, bits_per_byte(nats, nbytes), metric_unit(self.kind),
                      stderr, ntokens, nbytes, dict(self.detail))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _dist_device() -> torch.device:
    """Where an empty rank's zeros must live for all_reduce (NCCL only reduces CUDA tensors)."""
    if _distributed():
        import torch.distributed as dist

        if "gloo" not in dist.get_backend():
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
