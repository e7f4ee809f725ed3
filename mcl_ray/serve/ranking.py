"""Turning candidate scores into a list: exclude seen items, top-k, MMR diversity. Plain torch."""

from __future__ import annotations

import numpy as np
import torch


def exclude(scores: torch.Tensor, positions: np.ndarray | None) -> int:
    """Push the given candidate positions below every real score (probabilities are >= 0)."""
    if positions is None or not len(positions):
        return 0
    scores[torch.from_numpy(positions)] = -1.0
    return len(positions)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    return torch.topk(scores, min(k, len(scores))).indices.tolist()


def mmr(scores: torch.Tensor, vecs: torch.Tensor, k: int, diversity: float) -> list[int]:
    """Maximal marginal relevance: argmax (1-d)*score - d*max cosine similarity to the chosen.

    scores [I], vecs [I, E] L2-normalised; re-ranks a pool of the best max(20k, 200) only."""
    pool = torch.topk(scores, min(len(scores), max(20 * k, 200))).indices
    rel, vec = scores[pool], vecs[pool]
    sim_max = torch.full((len(pool),), -1.0)
    taken = torch.zeros(len(pool), dtype=torch.bool)
    chosen = []
    for _ in range(min(k, len(pool))):
        gain = (1 - diversity) * rel - diversity * sim_max.clamp(min=0)
        gain[taken] = -torch.inf
        j = int(torch.argmax(gain))
        taken[j] = True
        chosen.append(int(pool[j]))
        sim_max = torch.maximum(sim_max, vec @ vec[j])
    return chosen
