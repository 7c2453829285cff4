"""Compressed cut layer: the codecs ``comm.compress`` names, per sample of a batch.

A tensor's first dimension is the batch; each sample's entries are coded on their own, so a
sample's error does not depend on the others in its batch:

- ``topk:F`` keeps the fraction F of each sample's entries with the largest magnitude: their
  float32 values and int32 positions cross, the rest decode as zero (8 bytes per kept entry).
- ``int8`` rounds each entry to one of 255 levels of the sample's largest magnitude (one
  byte per entry and a float32 scale per sample): the error of an entry is at most half a
  level, ``max|x| / 254``.
- ``fp8`` casts each entry, scaled so that the sample's largest magnitude is float8 e4m3's
  largest (448), to e4m3 (one byte per entry and a float32 scale per sample): 3 mantissa
  bits, so a relative error of at most 1/16 for entries above e4m3's normal range.

No error feedback: carrying a batch's coding error into the next batch would add one
sample's residual to another sample's activation; what crosses is each batch's own.
The receiver knows the codec from the run's config and the tensor's shape from the
message's header, so the payload is all it needs (``Transport``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0
INT8_LEVELS = 127


@dataclass(frozen=True)
class Codec:
    name: str  # topk, int8 or fp8
    fraction: float = 1.0  # topk: the share of each sample's entries kept

    @classmethod
    def parse(cls, text: str) -> Codec | None:
        """``comm.compress`` as a codec; None for ``none``."""
        name, _, arg = text.partition(":")
        fix = "use none, topk:F with 0 < F <= 1 (e.g. topk:0.1), int8 or fp8"
        if name == "none" and not arg:
            return None
        if name in ("int8", "fp8") and not arg:
            if name == "fp8" and FP8 is None:
                raise ConfigError("comm.compress=fp8 needs torch.float8_e4m3fn, which this "
                                  f"torch {torch.__version__} lacks", "use int8 or a newer torch")
            return cls(name)
        if name == "topk":
            try:
                fraction = float(arg)
            except ValueError:
                raise ConfigError(f"comm.compress={text}: {arg!r} is not a fraction", fix) from None
            if not 0 < fraction <= 1:
                raise ConfigError(f"comm.compress={text}: the fraction must be in (0, 1]", fix)
            return cls(name, fraction)
        raise ConfigError(f"comm.compress={text!r} is not a codec", fix)

    def kept(self, per_sample: int) -> int:
        """Entries top-k keeps of a sample of ``per_sample``: at least one."""
        return max(1, math.ceil(self.fraction * per_sample))

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """The payload's bytes for a tensor of ``shape``."""
        samples, per_sample = shape[0], math.prod(shape[1:])
        if self.name == "topk":
            return samples * self.kept(per_sample) * 8
        return samples * (4 + per_sample)

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (samples first) as the payload's bytes, a flat uint8 tensor."""
        x = t.detach().reshape(t.shape[0], -1).float()
        if self.name == "topk":
            where = x.abs().topk(self.kept(x.shape[1]), dim=1, sorted=False).indices
            return torch.cat([_bytes(x.gather(1, where)), _bytes(where.to(torch.int32))])
        top = x.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        if self.name == "int8":
            scale = top / INT8_LEVELS
            coded = (x / scale[:, None]).round_().clamp_(-INT8_LEVELS, INT8_LEVELS)
            coded = coded.to(torch.int8)
        else:
            scale = top / FP8_MAX
            coded = (x / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        return torch.cat([_bytes(scale), _bytes(coded)])

    def decode(self, payload: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 tensor of ``shape`` that ``payload`` (from ``encode``) codes."""
        samples, per_sample = shape[0], math.prod(shape[1:])
        if self.name == "topk":
            k = self.kept(per_sample)
            values = payload[:samples * k * 4].view(torch.float32).reshape(samples, k)
            where = payload[samples * k * 4:].view(torch.int32).reshape(samples, k).long()
            out = torch.zeros(samples, per_sample, device=payload.device)
            return out.scatter_(1, where, values).reshape(shape)
        scale = payload[:samples * 4].view(torch.float32)
        coded = payload[samples * 4:].view(torch.int8 if self.name == "int8" else FP8)
        return (coded.float().reshape(samples, per_sample) * scale[:, None]).reshape(shape)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)
