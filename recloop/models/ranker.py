"""The multi-task ranker: one shared MLP over (standardised numeric features, optional categorical
embeddings) and two heads, P(completed) and expected log1p watch time.

Model only; features, training and scoring live in `recloop.training`. `RankerArgs` rebuilds the module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class RankerArgs:
    """Input width, hidden layers and categorical table sizes (index 0 = unknown) of a `RankerModel`."""

    n_numeric: int
    hidden: tuple[int, ...] = (128, 64)
    cat_cardinalities: tuple[int, ...] = field(default_factory=tuple)
    cat_dim: int = 8


class RankerModel(nn.Module):
    """`forward(numeric [B, F], cats [B, C]) -> (completion logit [B], predicted log1p watch seconds [B])`."""

    def __init__(self, args: RankerArgs) -> None:
        super().__init__()
        self.args = args
        self.cats = nn.ModuleList(
            nn.Embedding(max(n, 1), args.cat_dim, padding_idx=0) for n in args.cat_cardinalities
        )
        layers: list[nn.Module] = []
        d = args.n_numeric + args.cat_dim * len(args.cat_cardinalities)
        for width in args.hidden:
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.completion = nn.Linear(d, 1)
        self.watch = nn.Linear(d, 1)

    def forward(
        self, numeric: torch.Tensor, cats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [numeric]
        if len(self.cats):
            assert cats is not None, "this ranker was built with categorical inputs"
            parts += [emb(cats[:, i]) for i, emb in enumerate(self.cats)]
        h = self.body(torch.cat(parts, dim=1) if len(parts) > 1 else numeric)
        return self.completion(h).squeeze(1), self.watch(h).squeeze(1)
