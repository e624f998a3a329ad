"""The two-tower retrieval model: a user tower and a video tower that map to one L2-normalised space.

Model only (as in torchrec's examples/retrieval/modules/two_tower.py): data preparation, training and
retrieval live in `recloop.training`, the ANN index in `recloop.index`. `TwoTowerArgs` holds everything
needed to rebuild the module, so a saved model is `state_dict` + these args, never a pickled module.

User tower:  user-id embedding | device, country, age-bucket embeddings | standardised log1p activity
             counts | mean of the embeddings of the user's last N positively engaged videos  -> MLP -> L2
Video tower: video-id embedding | category, creator embeddings | tags (EmbeddingBag, mean) |
             standardised log duration and log1p age in days                                -> MLP -> L2

Code 0 of every field is "unknown". For the two id tables it is a learned vector (training replaces
ids by 0 at random, "id dropout", so that unknown users/videos get a useful embedding from the rest of
their features); for metadata fields it starts at zero, and for history and tags it is padding (ignored
by the mean). Small metadata fields share one table per tower (one lookup instead of one per field).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

USER_DENSE = ("log1p_impressions", "log1p_watches", "log1p_positives")
VIDEO_DENSE = ("log_duration", "log1p_age_days")


@dataclass(frozen=True)
class TwoTowerArgs:
    """Table sizes (vocab lengths, including index 0) and layer widths of a `TwoTowerModel`."""

    n_users: int
    n_videos: int
    n_devices: int
    n_countries: int
    n_ages: int
    n_categories: int
    n_creators: int
    n_tags: int
    id_dim: int = 32
    user_meta_dim: int = 4
    video_meta_dim: int = 16
    hidden_dim: int = 64
    out_dim: int = 64
    # Sparse gradients for the id and history tables (only the rows a batch touches are updated, with
    # torch.optim.SparseAdam): the tables grow with the catalog, dense updates would not.
    sparse_ids: bool = False


def _embedding(n: int, dim: int, padding: bool, sparse: bool = False) -> nn.Embedding:
    emb = nn.Embedding(max(n, 1), dim, padding_idx=0 if padding else None, sparse=sparse)
    nn.init.normal_(emb.weight, std=0.05)
    if padding:
        with torch.no_grad():
            emb.weight[0].zero_()
    return emb


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (cheaper to differentiate on CPU than F.normalize)."""
    return x * torch.rsqrt((x * x).sum(dim=1, keepdim=True).clamp_min(1e-12))


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class _MetaEmbedding(nn.Module):
    """Several small categorical fields in one table (one lookup per batch instead of one per field).

    Field f's codes (0 = unknown) live at rows `offsets[f] + code`; the unknown rows start at zero, and
    stay there unless the field is ever unknown in training.
    """

    def __init__(self, sizes: tuple[int, ...], dim: int) -> None:
        super().__init__()
        sizes = tuple(max(n, 1) for n in sizes)
        self.table = nn.Embedding(sum(sizes), dim)
        nn.init.normal_(self.table.weight, std=0.05)
        offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.long).cumsum(0)
        with torch.no_grad():
            self.table.weight[offsets].zero_()
        self.register_buffer("offsets", offsets)
        self.out_dim = dim * len(sizes)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table(codes + self.offsets).flatten(1)


class UserTower(nn.Module):
    """(user [B], meta [B,3] = device/country/age codes, dense [B,3], history [B,N]) -> unit [B, out_dim]."""

    def __init__(self, a: TwoTowerArgs) -> None:
        super().__init__()
        self.user = _embedding(a.n_users, a.id_dim, padding=False, sparse=a.sparse_ids)
        self.meta = _MetaEmbedding((a.n_devices, a.n_countries, a.n_ages), a.user_meta_dim)
        # Mean over the non-padding entries of each row; an empty history gives a zero vector.
        self.history = nn.EmbeddingBag(
            max(a.n_videos, 1), a.id_dim, mode="mean", padding_idx=0, sparse=a.sparse_ids
        )
        nn.init.normal_(self.history.weight, std=0.05)
        with torch.no_grad():
            self.history.weight[0].zero_()
        self.register_buffer("dense_mean", torch.zeros(len(USER_DENSE)))
        self.register_buffer("dense_std", torch.ones(len(USER_DENSE)))
        d_in = 2 * a.id_dim + self.meta.out_dim + len(USER_DENSE)
        self.mlp = _mlp(d_in, a.hidden_dim, a.out_dim)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        dense = (b["dense"] - self.dense_mean) / self.dense_std
        x = torch.cat([self.user(b["user"]), self.meta(b["meta"]), dense, self.history(b["history"])], dim=1)
        return l2_normalize(self.mlp(x))


class VideoTower(nn.Module):
    """(video [B], meta [B,2] = category/creator codes, tags [B,T], dense [B,2]) -> unit [B, out_dim]."""

    def __init__(self, a: TwoTowerArgs) -> None:
        super().__init__()
        self.video = _embedding(a.n_videos, a.id_dim, padding=False, sparse=a.sparse_ids)
        self.meta = _MetaEmbedding((a.n_categories, a.n_creators), a.video_meta_dim)
        self.tags = nn.EmbeddingBag(max(a.n_tags, 1), a.video_meta_dim, mode="mean", padding_idx=0)
        nn.init.normal_(self.tags.weight, std=0.05)
        with torch.no_grad():
            self.tags.weight[0].zero_()
        self.register_buffer("dense_mean", torch.zeros(len(VIDEO_DENSE)))
        self.register_buffer("dense_std", torch.ones(len(VIDEO_DENSE)))
        d_in = a.id_dim + self.meta.out_dim + a.video_meta_dim + len(VIDEO_DENSE)
        self.mlp = _mlp(d_in, a.hidden_dim, a.out_dim)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        dense = (b["dense"] - self.dense_mean) / self.dense_std
        x = torch.cat([self.video(b["video"]), self.meta(b["meta"]), self.tags(b["tags"]), dense], dim=1)
        return l2_normalize(self.mlp(x))


class TwoTowerModel(nn.Module):
    """Both towers; `forward(user_batch, video_batch) -> (user_vectors, video_vectors)`."""

    def __init__(self, args: TwoTowerArgs) -> None:
        super().__init__()
        self.args = args
        self.user_tower = UserTower(args)
        self.video_tower = VideoTower(args)

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The parameters that get sparse gradients (for SparseAdam); empty unless `args.sparse_ids`."""
        if not self.args.sparse_ids:
            return []
        return [self.user_tower.user.weight, self.user_tower.history.weight, self.video_tower.video.weight]

    def dense_parameters(self) -> list[nn.Parameter]:
        sparse = {id(p) for p in self.sparse_parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def forward(
        self, users: dict[str, torch.Tensor], videos: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_tower(users), self.video_tower(videos)


def in_batch_logits(
    user_vectors: torch.Tensor,
    video_vectors: torch.Tensor,
    temperature: float,
    log_q: torch.Tensor | None = None,
    item_ids: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Logits of a softmax over in-batch negatives: row i's positive is column i.

    `logits[i, j] = u_i . v_j / temperature - log q_j`: subtracting the log of each item's sampling
    probability `q_j` (its share of the training positives, i.e. how often it shows up as an in-batch
    negative) corrects the bias of in-batch sampling towards popular items (Yi et al., RecSys 2019).
    When `item_ids` is given, "accidental hits" are masked out: columns j != i holding the same item as
    row i's positive are not negatives.

    With `groups` = G > 1 the batch (B rows, B divisible by G) is split into G consecutive groups and
    each row's softmax runs over its own group: logits [G, B/G, B/G] (one optimizer step, G softmaxes;
    the same as accumulating the gradients of G batches of B/G). `groups=1` gives [B, B].
    """
    n = user_vectors.shape[0]
    if n % groups:
        raise ValueError(f"batch of {n} rows does not split into {groups} groups")
    u = user_vectors * (1.0 / temperature)
    v = video_vectors
    if log_q is not None:  # one matmul: [u/T, -1] . [v, log q] = u.v/T - log q
        u = torch.cat([u, -torch.ones(n, 1, dtype=u.dtype, device=u.device)], 1)
        v = torch.cat([v, log_q.unsqueeze(1).to(u.dtype)], 1)
    m = n // groups
    logits = torch.bmm(u.view(groups, m, -1), v.view(groups, m, -1).transpose(1, 2))
    if item_ids is not None:
        # Offsetting ids by group keeps pairs from different groups apart.
        span = int(item_ids.max()) + 1 if n else 1
        g = torch.arange(groups, device=item_ids.device).repeat_interleave(m)
        i, j = accidental_hits(item_ids + g * span)
        if len(i):
            fill = torch.tensor(torch.finfo(logits.dtype).min / 2, device=logits.device)
            # In place and outside autograd: bmm's backward does not need its output, and the gradient
            # of a masked logit is its softmax probability, exactly 0 at -1.7e38, so recording the
            # mask would only cost a [B, B] copy in the backward pass.
            with torch.no_grad():
                logits.index_put_((i // m, i % m, j % m), fill)
    return logits if groups > 1 else logits.squeeze(0)


def accidental_hits(item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the pairs i != j with item_ids[i] == item_ids[j], without a [B, B] comparison
    (only the few rows whose item occurs more than once in the batch are compared)."""
    _, inverse, counts = torch.unique(item_ids, return_inverse=True, return_counts=True)
    dup = torch.nonzero(counts[inverse] > 1).squeeze(1)
    if len(dup) == 0:
        empty = torch.zeros(0, dtype=torch.long, device=item_ids.device)
        return empty, empty
    g = inverse[dup]
    same = g.unsqueeze(1) == g.unsqueeze(0)
    same.fill_diagonal_(False)
    a, b = torch.nonzero(same, as_tuple=True)
    return dup[a], dup[b]


def in_batch_loss(logits: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy with the diagonal as targets ([B, B] or grouped [G, m, m] logits)."""
    m = logits.shape[-1]
    target = torch.arange(m, device=logits.device)
    if logits.dim() == 3:
        target = target.repeat(logits.shape[0])
    return F.cross_entropy(logits.reshape(-1, m), target)
