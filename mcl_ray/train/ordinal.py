"""Ordinal targets (train.ordinal_cuts): a cumulative-link loss next to the label's.

The label is one cut of the rating (ML-1M: rating > 3). Each cut c adds the target "rating > c",
scored as sigmoid(logit + b_c): the model's own logit plus one learned offset per cut. Every cut
moves the same score, so the model learns the order of all ratings (a 5 above a 4, a 1 below a 3),
while the label keeps its own loss term and its probability stays the one the model serves. The
offsets exist only in training: evaluation and serving read the logit alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcl_ray.core.config import ExperimentConfig
from mcl_ray.core.feature_spec import FeatureSpec


class OrdinalCuts(nn.Module):
    def __init__(self, cuts: list[float], rating_range: tuple[float, float], threshold: float):
        super().__init__()
        lo, hi = rating_range
        # label_soft is the rating scaled by the same range, so the cuts are compared in its units
        self.register_buffer("cuts", torch.tensor([(c - lo) / (hi - lo) for c in cuts], dtype=torch.float32))
        # a cut below the label's threshold is passed more often: its offset starts above 0
        self.offset = nn.Parameter(torch.tensor([4.0 * (threshold - c) / (hi - lo) for c in cuts]))

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, spec: FeatureSpec) -> OrdinalCuts | None:
        """The cuts in the units of the prepared label_soft column: scaled by the range prepare used
        (recorded in the spec; train.check_ready refuses a config whose range differs)."""
        cuts = cfg.train.ordinal_cuts
        if not cuts:
            return None
        return cls(cuts, spec.soft_label_range or cfg.prepare.validation.rating_range, cfg.prepare.label.threshold)

    def forward(self, logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:  # [B], [B] -> [B]
        target = (soft[:, None] > self.cuts + 1e-6).float()  # [B, C]: rating > cut
        return F.binary_cross_entropy_with_logits(logits[:, None] + self.offset, target, reduction="none").sum(1)

    def sync_grads(self, world: int) -> None:
        """DDP averages the model's gradients; the offsets live outside it, so average theirs here."""
        if world > 1 and self.offset.grad is not None:
            torch.distributed.all_reduce(self.offset.grad)
            self.offset.grad /= world
