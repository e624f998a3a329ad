"""Candidate sources: each proposes a few hundred videos per user out of the whole catalog, and each can
be evaluated alone (`MultiStageRecommender.source_only`).

| source | module | proposes | scores it gives the ranker |
|---|---|---|---|
| `item_to_item` | `item_to_item.py` | EASE top-n over the user's positives, and over everything they watched | `i2i_pos`, `i2i_watch`, `i2i_neg`, `i2i_watch_neg` |
| `two_tower` | `two_tower.py` | ANN (FAISS) top-n of the user tower's vector | `tt_score` |
| `popular` | `popular.py` | the most liked videos of the last weeks | item popularity features |
| `fresh` | `popular.py` | the newest uploads | item age |

Candidates are merged without duplicates (the first source in `SOURCES` order is the one recorded),
and every candidate gets every source's score, whichever source proposed it.
"""

from recloop.model_plane.sources.item_to_item import ItemToItem, ItemToItemConfig, ease_weights
from recloop.model_plane.sources.popular import Fresh, Popular
from recloop.model_plane.sources.two_tower import TwoTowerSource

SOURCES: tuple[str, ...] = ("item_to_item", "two_tower", "popular", "fresh")

__all__ = ["SOURCES", "Fresh", "ItemToItem", "ItemToItemConfig", "Popular", "TwoTowerSource", "ease_weights"]
