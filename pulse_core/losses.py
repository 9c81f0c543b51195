"""The PULSE loss grammar and its terms (pulse-reference.md section 6).

A loss is written `W1*NAME1+W2*NAME2...` (default `100*L2+0.05*GEOCROSS`). Unlike the reference,
spaces are allowed, a bare name means weight 1, and an unknown name is an error that lists the
known ones. Every term is computed per batch item first: the search needs per-sample values to
track each sample's best iterate, and the batch total is just their sum, so samples in one batch
optimise independently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pulse_core.errors import ConfigError

TERMS = ("L2", "L1", "GEOCROSS")
DEFAULT_LOSS = "100*L2+0.05*GEOCROSS"

_TERM_RE = re.compile(
    r"^(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z0-9_]+)$"
)


@dataclass(frozen=True)
class LossSpec:
    """A parsed loss: the ordered (weight, term) pairs of the grammar."""

    terms: tuple[tuple[float, str], ...]

    def __str__(self) -> str:
        return "+".join(f"{w:g}*{name}" for w, name in self.terms)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.terms)


def parse_loss(text: str) -> LossSpec:
    """Parse `100*L2 + 0.05*GEOCROSS`-style strings into a LossSpec."""
    if not text or not text.strip():
        raise ConfigError(f"empty loss; write it like {DEFAULT_LOSS!r}")
    terms: list[tuple[float, str]] = []
    for part in text.split("+"):
        part = part.strip()
        m = _TERM_RE.match(part)
        if not m:
            raise ConfigError(
                f"cannot parse loss term {part!r} in {text!r}; write terms as WEIGHT*NAME, "
                f"e.g. {DEFAULT_LOSS!r}"
            )
        name = m.group("name").upper()
        if name not in TERMS:
            raise ConfigError(
                f"unknown loss term {m.group('name')!r} in {text!r}; known terms: {', '.join(TERMS)}"
            )
        if name in (n for _, n in terms):
            raise ConfigError(f"loss term {name} appears twice in {text!r}")
        weight = float(m.group("weight")) if m.group("weight") else 1.0
        terms.append((weight, name))
    return LossSpec(tuple(terms))


def l2_per_sample(lr_gen: torch.Tensor, lr_target: torch.Tensor, eps: float) -> torch.Tensor:
    """max(mean squared error, eps) per item: the clamp makes a dead zone once within eps."""
    return (lr_gen - lr_target).pow(2).mean(dim=(1, 2, 3)).clamp(min=eps)


def l1_per_sample(lr_gen: torch.Tensor, lr_target: torch.Tensor, eps: float) -> torch.Tensor:
    return 10.0 * (lr_gen - lr_target).abs().mean(dim=(1, 2, 3)).clamp(min=eps)


def mse_per_sample(lr_gen: torch.Tensor, lr_target: torch.Tensor) -> torch.Tensor:
    """Unclamped MSE: what `converged` is judged on and what the manifest reports."""
    return (lr_gen - lr_target).pow(2).mean(dim=(1, 2, 3))


def geocross_per_sample(w: torch.Tensor) -> torch.Tensor:
    """Mean squared geodesic distance between every ordered pair of the L style vectors.

    `w` is (B, L, D) after the prior transform. A single latent (L = 1) gives zero, as does a
    tiled one; the reference treats both the same way.
    """
    b, n, d = w.shape
    if n == 1:
        return w.new_zeros(b)
    x = w.view(b, 1, n, d)
    y = w.view(b, n, 1, d)
    a = ((x - y).pow(2).sum(-1) + 1e-9).sqrt()
    bb = ((x + y).pow(2).sum(-1) + 1e-9).sqrt()
    theta = 2.0 * torch.atan2(a, bb)
    return (theta.pow(2) * d).mean(dim=(1, 2)) / 8.0


@dataclass
class LossValues:
    """Per-item values (B,) of each term and the weighted total."""

    terms: dict[str, torch.Tensor]
    total: torch.Tensor


def compute_loss(
    spec: LossSpec, lr_gen: torch.Tensor, lr_target: torch.Tensor, w: torch.Tensor, eps: float
) -> LossValues:
    """Evaluate every term of `spec` per batch item; the batch loss is `total.sum()`."""
    values: dict[str, torch.Tensor] = {}
    total = lr_gen.new_zeros(lr_gen.shape[0])
    for weight, name in spec.terms:
        if name == "L2":
            v = l2_per_sample(lr_gen, lr_target, eps)
        elif name == "L1":
            v = l1_per_sample(lr_gen, lr_target, eps)
        else:
            v = geocross_per_sample(w)
        values[name] = v
        total = total + weight * v
    return LossValues(values, total)
