"""The exploration slot: a share ε of the answer's slots shows a video the model did not put there.

With `RECLOOP_SERVING_EXPLORE_SHARE` = ε > 0, each of the k slots of a model answer is, independently
and with probability ε, given to a video drawn uniformly from the **exploration pool**: the candidates
the model ranked just below the answer (those not in it), at most `RECLOOP_SERVING_EXPLORE_POOL` (100) of
them, best first. Watched, excluded and safety-blocked videos never are candidates, so never in the
pool. Draws are without replacement (no video twice in an answer): the i-th explored slot of an answer
draws from the pool minus the videos earlier explored slots took. The explored video replaces the
slot's video (which leaves the answer); the other slots keep theirs, in place.

Propensities (what inverse propensity scoring divides by), per slot, given the answer's pool:

* explored slot: `propensity = ε / n`, n = the pool's size at that draw (`|pool|` for the first);
* slot not explored: `propensity = 1 - ε` (the probability that the model's video was kept there);
  1.0 when the pool was empty by then (nothing could have replaced it).

ε = 0 (the default) changes nothing: every slot has propensity 1.0 and `explored = false`. Fallback
answers (popularity) are not explored (propensity 1.0). All draws come from `random.Random(seed)` with
the seed derived from the request id, so an answer's exploration can be replayed from its id.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def explore_slots(k: int, pool_size: int, share: float, seed: int) -> list[tuple[int | None, float]]:
    """Per slot of an answer of `k` slots: (index drawn into the pool as it was left then, or None when
    the slot keeps the model's video; the slot's propensity). A slot that could not be explored (ε = 0,
    or the pool empty by then) keeps its video with propensity 1.0."""
    rng = random.Random(seed) if share > 0 else None
    out: list[tuple[int | None, float]] = []
    left = pool_size
    for _ in range(k):
        if rng is None or left <= 0:
            out.append((None, 1.0))
        elif rng.random() < share:
            out.append((rng.randrange(left), share / left))
            left -= 1
        else:
            out.append((None, 1.0 - share))
    return out


def apply_exploration(items: Sequence[T], pool: Sequence[T], share: float, seed: int) -> list[tuple[T, bool, float]]:
    """(item, explored, propensity) for every slot of `items` after exploration from `pool` (module
    docstring); `pool` must not share items with `items`."""
    remaining = list(pool)
    result = []
    for item, (index, propensity) in zip(items, explore_slots(len(items), len(remaining), share, seed)):
        result.append((item, False, propensity) if index is None else (remaining.pop(index), True, propensity))
    return result
