"""Online experiments: which arm a user is in (A/B) and how two rankings are merged (interleaving).

While the registry's `experiment` alias points at a version other than the champion's, the service
serves both (`recloop.serving.service`), under the experiment id `exp-v<champion>-v<challenger>`:

* **ab** (`RECLOOP_SERVING_EXPERIMENT_MODE=ab`): a user is in the challenger arm when a stable hash of
  (experiment id, user id) falls below `RECLOOP_SERVING_EXPERIMENT_SHARE`; the same user stays in the
  same arm for the whole experiment, on every replica, and a new experiment reshuffles users.
* **interleave**: both models rank for every request and `team_draft_interleave` merges the two lists;
  each item is credited to the team (arm) that placed it.

Pure functions, no state: the service decides when an experiment runs.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Sequence
from typing import TypeVar

CHAMPION_ARM = "champion"
CHALLENGER_ARM = "challenger"
INTERLEAVED = "interleaved"  # the response's `arm` under interleaving (each impression has its team)
MODES = ("ab", "interleave")

T = TypeVar("T")


def experiment_id(champion: str, challenger: str) -> str:
    """`exp-v<champion>-v<challenger>`: the id impressions, metrics and the online decision share."""
    return f"exp-v{champion}-v{challenger}"


def bucket(experiment: str, user_id: str) -> float:
    """A number in [0, 1) fixed by (experiment, user): the first 8 bytes of a BLAKE2b digest."""
    digest = hashlib.blake2b(f"{experiment}\x00{user_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def ab_arm(experiment: str, user_id: str, share: float) -> str:
    """The user's arm in an A/B experiment: `challenger` for a share `share` of users, stable per user."""
    return CHALLENGER_ARM if bucket(experiment, user_id) < share else CHAMPION_ARM


def team_draft_interleave(
    a: Sequence[T], b: Sequence[T], k: int, seed: int | random.Random, key=lambda x: x,
) -> list[tuple[T, int]]:
    """Team-draft interleaving (Radlinski, Kurup & Joachims, 2008) of rankings `a` (team 0) and `b`
    (team 1), at most `k` items: (item, team that placed it), best first.

    At each round the team with fewer picks so far (a coin flip when even, from `random.Random(seed)`)
    adds its best item not already placed; a team with nothing left lets the other pick. Items are
    compared by `key` (e.g. the video id). Deterministic given the seed (or pass a `random.Random`).
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    out: list[tuple[T, int]] = []
    placed: set[Hashable] = set()
    lists, next_ = (a, b), [0, 0]
    picks = [0, 0]

    def best_left(team: int) -> T | None:
        lst = lists[team]
        while next_[team] < len(lst) and key(lst[next_[team]]) in placed:
            next_[team] += 1
        return lst[next_[team]] if next_[team] < len(lst) else None

    while len(out) < k:
        left = (best_left(0), best_left(1))
        if left[0] is None and left[1] is None:
            break
        if picks[0] != picks[1]:
            team = 0 if picks[0] < picks[1] else 1
        else:
            team = 0 if rng.random() < 0.5 else 1
        if left[team] is None:
            team = 1 - team
        item = left[team]
        out.append((item, team))
        placed.add(key(item))
        picks[team] += 1
    return out
