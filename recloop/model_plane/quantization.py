"""int8 dynamic quantization of the two-tower's user tower, the part of the two-tower that runs online
(the video tower runs offline and at new uploads; its vectors live in the FAISS index).

`RECLOOP_QUANTIZE=int8` (default `off`) asks for it when the bundle is written (`train_ranking`):
`torch.ao.quantization.quantize_dynamic` turns the tower's `nn.Linear` layers into int8 layers (weights
int8, activations quantized on the fly; the embedding tables stay float32). It is kept only when the
retrieval quality stays within `TOLERANCE` (1 % relative) of the float tower's:

    recall@100 of the ANN candidates = share of each sampled user's positives of the newest day of the
    window found in the top 100 of the FAISS index, queried with the user's vector as of the day before
    (float tower vs int8 tower, same users, same index)

Otherwise the float tower is kept, and the reason is logged and recorded. Either way the outcome is in the
bundle's manifest (`bundle.json` → `metadata.quantization`): `load_bundle` quantizes the user tower again
when it says `user_tower: int8` (a dynamic quantization is a pure function of the float weights, so the
bundle keeps one set of weights and its checksums), and everything that loads the bundle — offline
evaluation, the latency gate's replay, serving — runs the same int8 tower.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUANTIZE_ENV = "RECLOOP_QUANTIZE"
MODES = ("off", "int8")
TOLERANCE = 0.01  # relative recall@100 the int8 tower may lose
K = 100
MAX_USERS = 2_000
DAY_US = 86_400 * 1_000_000


def quantize_mode() -> str:
    """`RECLOOP_QUANTIZE` (off | int8, default off); anything else is a one-sentence ValueError."""
    mode = (os.environ.get(QUANTIZE_ENV) or "off").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{QUANTIZE_ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def quantized_user_tower(tower: Any) -> Any:
    """A copy of `tower` with its `nn.Linear` layers int8 (dynamic quantization), in eval mode."""
    import torch

    with warnings.catch_warnings():
        # torch 2.13 announces the deprecation of its quantized tensor constructors (the successor is the
        # torchao package); the API works, and the warning would be printed at every model load.
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(tower).eval(), {torch.nn.Linear},
                                                      dtype=torch.qint8)


def apply(two_tower: Any) -> None:
    """Replaces the user tower of `two_tower` (a `TwoTowerSource`) by its int8 version, in place."""
    model = two_tower.model.model
    model.user_tower = quantized_user_tower(model.user_tower)


def ann_recall(two_tower: Any, history: Any, tower: Any = None, *, k: int = K, max_users: int = MAX_USERS,
               seed: int = 0) -> dict[str, Any]:
    """recall@k of the ANN candidates (see the module docstring) with `tower` (default: the source's own
    user tower); also the users and positives it was measured on."""
    from recloop.training import tower_forward, user_tower_inputs

    tt = two_tower.model
    day_start = int(history.cutoff_us) - DAY_US
    recent = (history.ev_time >= day_start) & history.ev_positive
    users = np.unique(history.ev_user[recent])
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    if not len(users):
        return {"recall": float("nan"), "users": 0, "positives": 0}
    ids = history.users[users].to_numpy(dtype=object)
    inputs = user_tower_inputs(tt, ids, np.full(len(ids), day_start, np.int64))
    vectors = tower_forward(tower if tower is not None else tt.model.user_tower, inputs, tt.args.out_dim)
    rows, _ = two_tower.top(vectors.astype(np.float32), k)
    ev_user, ev_item = history.ev_user[recent], history.ev_item[recent]
    sampled = np.isin(ev_user, users)
    position = np.searchsorted(users, ev_user[sampled])  # `users` is sorted
    hits = (rows[position] == ev_item[sampled][:, None]).any(axis=1)
    total = int(len(hits))
    return {"recall": float(hits.mean()) if total else float("nan"), "users": int(len(users)), "positives": total}


def decide(two_tower: Any, history: Any, *, mode: str | None = None, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Whether the bundle's user tower is quantized: the record written in its manifest. With `mode`
    int8 (default: `quantize_mode()`), measures both towers and keeps int8 when its recall@100 is within
    `tolerance` (relative) of the float tower's; the reason is logged either way."""
    mode = quantize_mode() if mode is None else mode
    if mode == "off" or two_tower is None:
        return {"requested": mode, "user_tower": "float32",
                "reason": "not asked for" if two_tower is not None else "no two-tower in this bundle"}
    base = ann_recall(two_tower, history)
    int8 = ann_recall(two_tower, history, quantized_user_tower(two_tower.model.model.user_tower))
    floor = base["recall"] * (1 - tolerance)
    keep = bool(np.isfinite(base["recall"]) and int8["recall"] >= floor)
    record = {"requested": mode, "user_tower": "int8" if keep else "float32", "tolerance": tolerance,
              f"float32_recall_at_{K}": round(float(base["recall"]), 6),
              f"int8_recall_at_{K}": round(float(int8["recall"]), 6),
              "users": base["users"], "positives": base["positives"]}
    if keep:
        record["reason"] = (f"int8 recall@{K} {int8['recall']:.4f} within {tolerance:.0%} of float32's "
                            f"{base['recall']:.4f}")
        log.info("user tower quantized to int8: %s", record["reason"])
    else:
        record["reason"] = (f"int8 user tower refused: recall@{K} {int8['recall']:.4f} below float32's "
                            f"{base['recall']:.4f} by more than {tolerance:.0%}" if np.isfinite(base["recall"])
                            else "int8 user tower refused: no positives on the newest day to measure it on")
        log.warning("%s; the float32 tower is kept", record["reason"])
    return record
