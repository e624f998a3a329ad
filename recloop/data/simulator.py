"""A deterministic simulator of a video platform: users, videos and impressions, one day at a time.

The simulated world has learnable structure so that a recommender trained on it clearly beats
popularity:

* every category has a centroid in a latent space; users and videos get latent vectors near the
  centroids of their (preferred) categories, so the dot product ``u . v`` carries real preference;
* users concentrate their interest on 2-3 categories (a Dirichlet over a few categories) and have a
  handful of favourite creators;
* video popularity is heavy-tailed (Pareto, i.e. Zipf-like), new videos get a freshness boost that
  decays over days, and the watch probability falls with the slate position (position bias);
* active users are drawn each day by a heavy-tailed activity propensity; each session shows a slate of
  impressions at positions 0..n-1 on one surface.

An impression's video is chosen by first drawing a category (from the user's preference, or from the
global category mix for a share of "exploration" impressions) and then a video inside that category by
popularity x freshness. Whether it is watched is Bernoulli(sigmoid(affinity - position penalty + bias))
with ``affinity = w * u.v + quality + favourite-creator bonus``; the watched fraction is Beta-distributed
with a mean that rises with the same affinity.

Everything is vectorised with numpy (no per-event Python loop) and generated one day at a time, so memory
stays flat however many days are simulated: the only state carried between days is the user and video
population. Day ``i`` is drawn from ``numpy.random.default_rng([seed, i, ...])`` plus that population, so
the same seed gives byte-identical tables, and a drift scenario leaves every day before ``drift_day``
exactly as the ``none`` scenario would produce it.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recloop.data.schemas import AGE_BUCKETS, DEVICES, EVENTS, SURFACES, TABLE_ORDER, USERS, VIDEOS
from recloop.lake import Lake, partition_key

SCENARIOS = ("none", "category_surge", "new_user_wave", "device_shift", "watch_time_inflation")
FORMATS = ("parquet", "csv")

BASE_CATEGORIES = (
    "music", "gaming", "news", "sports", "comedy", "education", "cooking", "travel",
    "tech", "beauty", "kids", "film", "science", "fitness", "pets", "diy",
)  # fmt: skip

# Eight tags per category (the first is the category itself); extra categories get generic ones.
_TAG_WORDS = {
    "music": ("live", "cover", "playlist", "remix", "concert", "acoustic", "lyrics"),
    "gaming": ("walkthrough", "speedrun", "esports", "minecraft", "review", "letsplay", "retro"),
    "news": ("politics", "world", "breaking", "economy", "interview", "analysis", "local"),
    "sports": ("football", "basketball", "highlights", "tennis", "training", "running", "cycling"),
    "comedy": ("standup", "sketch", "prank", "parody", "funny", "memes", "improv"),
    "education": ("lecture", "math", "history", "language", "tutorial", "exam", "explainer"),
    "cooking": ("recipe", "baking", "vegan", "bbq", "dessert", "streetfood", "quick"),
    "travel": ("vlog", "hiking", "citytour", "beach", "roadtrip", "budget", "camping"),
    "tech": ("unboxing", "review", "smartphone", "programming", "ai", "gadgets", "pcbuild"),
    "beauty": ("makeup", "skincare", "hair", "nails", "fashion", "haul", "grwm"),
    "kids": ("cartoon", "nursery", "toys", "learning", "songs", "animation", "crafts"),
    "film": ("trailer", "review", "shortfilm", "behindthescenes", "analysis", "classic", "scifi"),
    "science": ("space", "physics", "biology", "chemistry", "experiment", "nature", "astronomy"),
    "fitness": ("workout", "yoga", "hiit", "strength", "stretching", "nutrition", "running"),
    "pets": ("cats", "dogs", "funny", "training", "rescue", "birds", "aquarium"),
    "diy": ("woodworking", "repair", "crafts", "homedecor", "garden", "tools", "upcycle"),
}
_GENERIC_TAG_WORDS = ("intro", "howto", "best", "top10", "daily", "live", "short")
_TAGS_PER_CATEGORY = 8
_TITLE_ADJECTIVES = (
    "Epic", "Quick", "Ultimate", "Daily", "Easy", "Amazing", "Honest", "Tiny", "Big", "Late-night",
    "Weekend", "Beginner's", "Pro", "Secret", "Classic", "Wild",
)  # fmt: skip
_TITLE_NOUNS = (
    "guide", "moments", "session", "story", "challenge", "tips", "vlog", "review", "breakdown",
    "compilation", "diary", "basics",
)  # fmt: skip

COUNTRIES = ("US", "IN", "BR", "GB", "DE", "ID", "MX", "JP", "FR", "CA")
_COUNTRY_P = 1.0 / np.arange(1, len(COUNTRIES) + 1) ** 1.2
_COUNTRY_P = _COUNTRY_P / _COUNTRY_P.sum()
# device_shift: after the drift day "IN" takes the lead from "US" among arrivals and active users.
DRIFT_COUNTRY = "IN"
_COUNTRY_P_SHIFTED = _COUNTRY_P.copy()
_i_us, _i_drift = COUNTRIES.index("US"), COUNTRIES.index(DRIFT_COUNTRY)
_COUNTRY_P_SHIFTED[[_i_us, _i_drift]] = _COUNTRY_P[[_i_drift, _i_us]]
_DEVICE_P = np.array([0.45, 0.33, 0.17, 0.05])  # android, ios, web, tv (order of schemas.DEVICES)
_DEVICE_P_SHIFTED = np.array([0.20, 0.15, 0.15, 0.50])
_AGE_P = np.array([0.08, 0.27, 0.28, 0.18, 0.11, 0.08])  # order of schemas.AGE_BUCKETS
_SURFACE_P = np.array([0.50, 0.25, 0.10, 0.15])  # order of schemas.SURFACES
assert len(_DEVICE_P) == len(DEVICES) and len(_AGE_P) == len(AGE_BUCKETS) and len(_SURFACE_P) == len(SURFACES)

US_PER_S = 1_000_000
US_PER_DAY = 86_400 * US_PER_S
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# --- behaviour parameters -------------------------------------------------------------------------
SLATE_MIN, SLATE_MAX = 4, 20  # impressions per session (positions 0..n-1)
EXPLORE_SHARE = 0.3  # impressions whose category comes from the global mix, not the user
POPULARITY_ALPHA = 1.2  # Pareto tail index of video popularity
POPULARITY_CAP = 1_000.0
FRESHNESS_BOOST, FRESHNESS_TAU_DAYS = 4.0, 2.0  # weight x (1 + boost * exp(-age / tau))
NEW_USER_BOOST = 2.0  # session weight of users who signed up today
UV_WEIGHT = 4.0
FAV_CREATOR_BONUS = 1.0
WATCH_BIAS = -1.8
POSITION_PENALTY = 0.12  # logit per position
FRACTION_BIAS, FRACTION_WEIGHT, FRACTION_CONCENTRATION = -1.5, 0.6, 4.0
LIKE_BIAS = -6.5
N_FAV_CREATORS = 3
# drift strengths
SURGE_FACTOR = 5.0
WAVE_USERS_FACTOR, WAVE_SESSION_FACTOR = 10, 3.0
SHIFT_TV_ACTIVITY, SHIFT_COUNTRY_ACTIVITY = 4.0, 3.0
INFLATION_SHIFT = 1.5  # added to the logit of the mean watched fraction
# closed loop: what the open loop expresses through exposure becomes a watch-logit term (`respond`)
CLOSED_FRESHNESS_WEIGHT = 0.5  # x log(freshness multiplier): up to +0.8 logit for a new upload


@dataclass(frozen=True)
class SimConfig:
    """What to simulate. Every field has a default; values are checked on construction."""

    seed: int = 7
    start: date = date(2025, 1, 1)
    days: int = 14
    initial_users: int = 5_000
    initial_videos: int = 2_000
    new_users_per_day: int = 100
    new_videos_per_day: int = 60
    events_per_day: int = 20_000  # impressions per day; the realised count varies by a few %
    n_categories: int = 16
    n_creators: int = 300
    latent_dim: int = 8
    scenario: str = "none"
    drift_day: int = 7  # 0-based index of the first drifted day

    def __post_init__(self) -> None:
        start = self.start
        if isinstance(start, str):
            try:
                start = date.fromisoformat(start)
            except ValueError:
                raise ValueError(f"start must be a date or 'YYYY-MM-DD', got {self.start!r}") from None
        if isinstance(start, datetime):
            start = start.date()
        if not isinstance(start, date):
            raise ValueError(f"start must be a date, got {type(self.start).__name__}")
        object.__setattr__(self, "start", start)

        def check_int(name: str, minimum: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")

        check_int("seed", 0)
        check_int("days", 1)
        check_int("initial_users", 1)
        check_int("initial_videos", 1)
        check_int("new_users_per_day", 0)
        check_int("new_videos_per_day", 0)
        check_int("events_per_day", 1)
        check_int("n_categories", 1)
        check_int("n_creators", 1)
        check_int("latent_dim", 1)
        check_int("drift_day", 0)
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
        if self.scenario != "none" and self.drift_day >= self.days:
            raise ValueError(
                f"drift_day ({self.drift_day}) must be < days ({self.days}) for scenario {self.scenario!r}, "
                "or the drift never happens"
            )

    def date_of(self, index: int) -> date:
        return self.start + timedelta(days=index)


def category_names(n: int) -> list[str]:
    """The first `n` category names: the 16 built-in ones, then cat17, cat18, ..."""
    return [BASE_CATEGORIES[i] if i < len(BASE_CATEGORIES) else f"cat{i + 1}" for i in range(n)]


def _tag_vocabulary(categories: list[str]) -> list[str]:
    """Flat list: category c's tags are entries c*8 .. c*8+7."""
    out: list[str] = []
    for cat in categories:
        words = _TAG_WORDS.get(cat)
        tags = [cat, *words] if words else [cat, *(f"{cat}-{w}" for w in _GENERIC_TAG_WORDS)]
        out.extend(tags[:_TAGS_PER_CATEGORY])
    return out


def _us(d: date) -> int:
    """Microseconds since the epoch at 00:00 UTC of `d`."""
    return int((datetime(d.year, d.month, d.day, tzinfo=timezone.utc) - _EPOCH).total_seconds()) * US_PER_S


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _choice(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """`n` draws from the discrete distribution `p` by inverse CDF (vectorised)."""
    cdf = np.cumsum(p)
    idx = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
    return np.minimum(idx, len(p) - 1)


def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers, pa.int64()), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _timestamps(us: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(us, dtype=np.int64), pa.int64()).cast(USERS.schema.field("signup_time").type)


class _CategorySampler:
    """Draws an item within a given category with probability proportional to its weight.

    One cumulative sum over the items sorted by category; a draw for category c lands inside c's slice.
    Items with zero weight must not be passed in (they could be hit at a slice boundary).
    """

    def __init__(self, categories: np.ndarray, weights: np.ndarray, items: np.ndarray, n_categories: int):
        order = np.argsort(categories, kind="stable")
        self.items = items[order]
        self.cum = np.cumsum(weights[order])
        counts = np.bincount(categories, minlength=n_categories)
        self.end = np.cumsum(counts)
        self.begin = self.end - counts
        self.total = np.bincount(categories, weights=weights, minlength=n_categories)
        self.before = np.concatenate([[0.0], self.cum])[self.begin]
        self.nonempty = counts > 0

    def draw(self, category: np.ndarray, u: np.ndarray) -> np.ndarray:
        target = self.before[category] + u * self.total[category]
        pos = np.searchsorted(self.cum, target, side="right")
        pos = np.clip(pos, self.begin[category], self.end[category] - 1)
        return self.items[pos]


class Simulator:
    """Generates the platform's data day by day: ``sim.day(i)`` -> {"users", "videos", "events"}.

    Days are meant to be produced in order 0, 1, 2, ... (the population grows); asking for an earlier
    day rebuilds the population from the start and asking for a later one fast-forwards (arrivals only),
    so any day can be requested and always comes out the same.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config = config or SimConfig()
        self.categories = category_names(config.n_categories)
        self._tags = pa.array(_tag_vocabulary(self.categories), pa.string())
        n_cat, dim = config.n_categories, config.latent_dim

        world = np.random.default_rng([config.seed, 0, 3])
        self._centroids = world.normal(0.0, 1.0 / np.sqrt(dim), (n_cat, dim))
        ranks = world.permutation(n_cat) + 1
        self._category_weight = 1.0 / ranks**0.6  # some categories are more popular than others
        self._category_duration = np.exp(world.normal(np.log(300.0), 0.5, n_cat))  # median seconds
        creator_category = world.permutation(np.arange(config.n_creators) % n_cat)
        self._creator_quality = world.normal(0.0, 0.3, config.n_creators)
        self._creators_by_category = np.argsort(creator_category, kind="stable")
        counts = np.bincount(creator_category, minlength=n_cat)
        self._creator_end = np.cumsum(counts)
        self._creator_begin = self._creator_end - counts
        self._creator_count = counts
        # category_surge: one of the less popular half of the categories surges, so the jump is visible.
        less_popular = np.flatnonzero(ranks > n_cat // 2) if n_cat > 1 else np.arange(n_cat)
        self.surge_category_index = int(world.choice(less_popular))
        self.surge_category = self.categories[self.surge_category_index]
        self._reset()

    # --- population state ---------------------------------------------------------------------------

    def _reset(self) -> None:
        c = self.config
        dim, n_cat = c.latent_dim, c.n_categories
        self._next_day = 0
        self.n_users = 0
        self.n_videos = 0
        self._u_vec = np.empty((0, dim), np.float32)
        self._u_pref = np.empty((0, n_cat), np.float64)
        self._u_fav = np.empty((0, N_FAV_CREATORS), np.int32)
        self._u_prop = np.empty(0, np.float64)
        self._u_device = np.empty(0, np.int8)
        self._u_country = np.empty(0, np.int8)
        self._u_signup = np.empty(0, np.int64)
        self._v_vec = np.empty((0, dim), np.float32)
        self._v_cat = np.empty(0, np.int32)
        self._v_creator = np.empty(0, np.int32)
        self._v_duration = np.empty(0, np.float64)
        self._v_quality = np.empty(0, np.float64)
        self._v_pop = np.empty(0, np.float64)
        self._v_upload = np.empty(0, np.int64)
        self._first_new_user = 0
        self._response_rng: tuple[int, np.random.Generator] | None = None

    def _drifted(self, index: int, scenario: str) -> bool:
        return self.config.scenario == scenario and index >= self.config.drift_day

    def _add_users(self, rng: np.random.Generator, n: int, t_lo: int, t_hi: int, shifted: bool) -> pa.Table:
        c = self.config
        n_cat, dim = c.n_categories, c.latent_dim
        signup = np.sort(rng.integers(t_lo, t_hi, n, dtype=np.int64))
        country = _choice(rng, _COUNTRY_P_SHIFTED if shifted else _COUNTRY_P, n).astype(np.int8)
        device = _choice(rng, _DEVICE_P_SHIFTED if shifted else _DEVICE_P, n).astype(np.int8)
        age = _choice(rng, _AGE_P, n)
        # Category preference: a Dirichlet over 2-3 categories (picked by category popularity, Gumbel
        # top-k) plus a little mass spread over all categories.
        k = rng.integers(2, 4, n)
        keys = np.log(self._category_weight)[None, :] + rng.gumbel(size=(n, n_cat))
        rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
        focus = rng.gamma(1.0, size=(n, n_cat)) * (rank < k[:, None])
        focus /= np.maximum(focus.sum(axis=1, keepdims=True), 1e-12)
        pref = 0.92 * focus + 0.08 / n_cat
        vec = pref @ self._centroids + rng.normal(0.0, 0.3 / np.sqrt(dim), (n, dim))
        # Favourite creators: creators of categories drawn from the user's preference.
        cum = np.cumsum(pref, axis=1)
        fav_cat = (cum[:, None, :] < rng.random((n, N_FAV_CREATORS, 1))).sum(axis=2).clip(max=n_cat - 1)
        fav = self._creator_in(fav_cat, rng.random((n, N_FAV_CREATORS)))
        prop = rng.lognormal(0.0, 1.0, n)

        first = self.n_users
        self._u_vec = np.concatenate([self._u_vec, vec.astype(np.float32)])
        self._u_pref = np.concatenate([self._u_pref, pref])
        self._u_fav = np.concatenate([self._u_fav, fav.astype(np.int32)])
        self._u_prop = np.concatenate([self._u_prop, prop])
        self._u_device = np.concatenate([self._u_device, device])
        self._u_country = np.concatenate([self._u_country, country])
        self._u_signup = np.concatenate([self._u_signup, signup])
        self.n_users += n
        return pa.Table.from_arrays(
            [
                _ids("u", np.arange(first, first + n), 7),
                pa.array(COUNTRIES, pa.string()).take(pa.array(country.astype(np.int32))),
                pa.array(AGE_BUCKETS, pa.string()).take(pa.array(age.astype(np.int32))),
                _timestamps(signup),
                pa.array(DEVICES, pa.string()).take(pa.array(device.astype(np.int32))),
            ],
            schema=USERS.schema,
        )

    def _creator_in(self, category: np.ndarray, u: np.ndarray) -> np.ndarray:
        count = self._creator_count[category]
        offset = np.minimum((u * count).astype(np.int64), np.maximum(count - 1, 0))
        idx = np.minimum(self._creator_begin[category] + offset, self.config.n_creators - 1)
        anyone = (u * self.config.n_creators).astype(np.int64)  # categories without creators
        return np.where(count > 0, self._creators_by_category[idx], anyone)

    def _add_videos(self, rng: np.random.Generator, n: int, t_lo: int, t_hi: int) -> pa.Table:
        c = self.config
        dim = c.latent_dim
        upload = np.sort(rng.integers(t_lo, t_hi, n, dtype=np.int64))
        cat = _choice(rng, self._category_weight, n).astype(np.int32)
        creator = self._creator_in(cat, rng.random(n)).astype(np.int32)
        duration = np.round(
            np.clip(np.exp(rng.normal(np.log(self._category_duration[cat]), 0.8)), 10.0, 7200.0), 1
        )
        quality = self._creator_quality[creator] + rng.normal(0.0, 0.4, n)
        pop = np.minimum(rng.pareto(POPULARITY_ALPHA, n) + 1.0, POPULARITY_CAP) * np.exp(0.3 * quality)
        vec = self._centroids[cat] + rng.normal(0.0, 0.6 / np.sqrt(dim), (n, dim))
        # Tags: 1-4 distinct tags from the category's vocabulary; title from an adjective, the first tag
        # and a noun.
        n_tags = rng.integers(1, 5, n)
        slots = np.argsort(rng.random((n, _TAGS_PER_CATEGORY)), axis=1)[:, :4]
        first_tag = tags = self._tags.take(pa.array(cat.astype(np.int64) * _TAGS_PER_CATEGORY + slots[:, 0]))
        for j in range(1, 4):  # append the j-th tag where a video has more than j (columns, not rows)
            tag = self._tags.take(pa.array(cat.astype(np.int64) * _TAGS_PER_CATEGORY + slots[:, j]))
            tags = pc.if_else(pa.array(n_tags > j), pc.binary_join_element_wise(tags, tag, "|"), tags)
        adjective = pa.array(_TITLE_ADJECTIVES).take(pa.array(rng.integers(0, len(_TITLE_ADJECTIVES), n)))
        noun = pa.array(_TITLE_NOUNS).take(pa.array(rng.integers(0, len(_TITLE_NOUNS), n)))
        title = pc.binary_join_element_wise(adjective, first_tag, noun, " ")

        first = self.n_videos
        self._v_vec = np.concatenate([self._v_vec, vec.astype(np.float32)])
        self._v_cat = np.concatenate([self._v_cat, cat])
        self._v_creator = np.concatenate([self._v_creator, creator])
        self._v_duration = np.concatenate([self._v_duration, duration])
        self._v_quality = np.concatenate([self._v_quality, quality])
        self._v_pop = np.concatenate([self._v_pop, pop])
        self._v_upload = np.concatenate([self._v_upload, upload])
        self.n_videos += n
        return pa.Table.from_arrays(
            [
                _ids("v", np.arange(first, first + n), 7),
                title,
                tags,
                pa.array(self.categories, pa.string()).take(pa.array(cat)),
                _ids("c", creator, 5),
                pa.array(duration, pa.float64()),
                _timestamps(upload),
            ],
            schema=VIDEOS.schema,
        )

    # --- days ---------------------------------------------------------------------------------------

    def day(self, index: int) -> dict[str, pa.Table]:
        """The users who signed up, videos uploaded and impressions served on day `index` (0-based)."""
        tables = self.arrivals(index)
        c = self.config
        day_start = _us(c.date_of(index))
        rng = np.random.default_rng([c.seed, index, 1])
        tables["events"] = self._events(rng, index, day_start, day_start + US_PER_DAY, self._first_new_user)
        return tables

    def iter_days(self):
        """Iterate over (date, tables) for every configured day, in order."""
        for i in range(self.config.days):
            yield self.config.date_of(i), self.day(i)

    def arrivals(self, index: int) -> dict[str, pa.Table]:
        """The users who signed up and the videos uploaded on day `index` ({"users", "videos"}); the
        population then includes them (what `sessions` and `respond` of that day draw from)."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"day index must be a non-negative integer, got {index!r}")
        if index < self._next_day:
            self._reset()
        while self._next_day < index:
            self._step(self._next_day, emit=False)
        tables = self._step(index, emit=True)
        assert tables is not None
        return tables

    def _step(self, index: int, emit: bool) -> dict[str, pa.Table] | None:
        c = self.config
        day_start = _us(c.date_of(index))
        day_end = day_start + US_PER_DAY
        first_new_user = self.n_users
        shifted = self._drifted(index, "device_shift")

        arrivals = np.random.default_rng([c.seed, index, 0])
        parts_u, parts_v = [], []
        if index == 0:
            initial = np.random.default_rng([c.seed, 0, 2])
            year_ago = day_start - 365 * US_PER_DAY
            parts_u.append(self._add_users(initial, c.initial_users, year_ago, day_start, shifted=False))
            parts_v.append(self._add_videos(initial, c.initial_videos, year_ago, day_start))
            first_new_user = self.n_users
        wave = self._drifted(index, "new_user_wave")
        n_new_users = c.new_users_per_day * (WAVE_USERS_FACTOR if wave else 1)
        # New users sign up before 22:00 so that they have time for a session the same day.
        last_signup = day_end - 2 * 3600 * US_PER_S
        parts_u.append(self._add_users(arrivals, n_new_users, day_start, last_signup, shifted))
        parts_v.append(self._add_videos(arrivals, c.new_videos_per_day, day_start, day_end))
        self._next_day = index + 1
        self._first_new_user = first_new_user
        self._response_rng = None
        if not emit:
            return None
        users = pa.concat_tables(parts_u) if len(parts_u) > 1 else parts_u[0]
        videos = pa.concat_tables(parts_v) if len(parts_v) > 1 else parts_v[0]
        return {"users": users, "videos": videos}

    def _at_day(self, index: int) -> None:
        """Brings the population to day `index` (its arrivals included) unless it is there already."""
        if self._next_day != index + 1:
            self.arrivals(index)

    # --- the three parts of a day's impressions: sessions, videos, responses -----------------------

    def _draw_sessions(
        self, rng: np.random.Generator, index: int, day_start: int, day_end: int, first_new_user: int
    ) -> "Sessions":
        c = self.config
        # Sessions: users drawn by activity propensity (new users and drifted groups boosted).
        weight = self._u_prop.copy()
        new_boost = NEW_USER_BOOST * (WAVE_SESSION_FACTOR if self._drifted(index, "new_user_wave") else 1.0)
        weight[first_new_user:] *= new_boost
        if self._drifted(index, "device_shift"):
            weight[self._u_device == DEVICES.index("tv")] *= SHIFT_TV_ACTIVITY
            weight[self._u_country == COUNTRIES.index(DRIFT_COUNTRY)] *= SHIFT_COUNTRY_ACTIVITY
        n_sessions = max(1, int(round(c.events_per_day / ((SLATE_MIN + SLATE_MAX) / 2))))
        s_user = _choice(rng, weight, n_sessions)
        s_len = rng.integers(SLATE_MIN, SLATE_MAX + 1, n_sessions)
        s_surface = _choice(rng, _SURFACE_P, n_sessions)
        s_gap = rng.integers(3 * US_PER_S, 40 * US_PER_S, n_sessions)  # between consecutive impressions
        lo = np.maximum(day_start, self._u_signup[s_user] + US_PER_S)
        hi = day_end - 1 - (s_len - 1) * s_gap
        s_start = lo + (rng.random(n_sessions) * (hi - lo)).astype(np.int64)
        return Sessions(index, s_user, s_len, s_surface, s_start, s_gap)

    def _choose_videos(
        self, rng: np.random.Generator, index: int, day_start: int, user: np.ndarray, t: np.ndarray
    ) -> np.ndarray:
        """The open loop's platform: each impression's video drawn from the user's category preference
        (or the global mix) and popularity x freshness inside the category."""
        n_cat = self.config.n_categories
        n = len(user)
        # Category: from the user's preference, or from the global mix for exploration impressions.
        # Only categories that already had a video before today can be chosen.
        video_ids = np.arange(self.n_videos)
        old = self._v_upload < day_start
        cat_factor = np.bincount(self._v_cat[old], minlength=n_cat).astype(bool).astype(np.float64)
        if self._drifted(index, "category_surge"):
            cat_factor[self.surge_category_index] *= SURGE_FACTOR
        pref = self._u_pref * cat_factor
        cum = np.cumsum(pref / pref.sum(axis=1, keepdims=True), axis=1).astype(np.float32)
        u_cat = rng.random(n).astype(np.float32)
        cat_user = (cum[user] < u_cat[:, None]).sum(axis=1)
        global_p = self._category_weight * cat_factor
        cat_global = _choice(rng, global_p, n)
        cat = np.where(rng.random(n) < EXPLORE_SHARE, cat_global, cat_user).clip(max=n_cat - 1)

        # Video within the category by popularity x freshness. Videos uploaded later today may only be
        # shown after their upload: a draw that lands before the upload is redrawn among older videos.
        w = self._v_pop * self._freshness(day_start + US_PER_DAY // 2)
        u_vid = rng.random(n)
        video = _CategorySampler(self._v_cat, w, video_ids, n_cat).draw(cat, u_vid)
        early = self._v_upload[video] >= t
        if early.any():
            fallback = _CategorySampler(self._v_cat[old], w[old], video_ids[old], n_cat)
            video[early] = fallback.draw(cat[early], u_vid[early])
        return video

    def _freshness(self, at_us: int | np.ndarray, videos: np.ndarray | None = None) -> np.ndarray:
        """1 + boost x exp(-age / tau): how much a new video's appeal is raised, at time `at_us`."""
        upload = self._v_upload if videos is None else self._v_upload[videos]
        age_days = np.maximum(at_us - upload, 0) / US_PER_DAY
        return 1.0 + FRESHNESS_BOOST * np.exp(-age_days / FRESHNESS_TAU_DAYS)

    def _respond(
        self,
        rng: np.random.Generator,
        index: int,
        user: np.ndarray,
        video: np.ndarray,
        position: np.ndarray,
        demand: np.ndarray | float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Watch decision, watched seconds and like of each impression (the ground truth); `demand` is
        the closed loop's extra watch logit (0 in the open loop, where demand acts on exposure)."""
        n = len(user)
        uv = np.einsum("ij,ij->i", self._u_vec[user], self._v_vec[video], dtype=np.float64)
        fav = (self._u_fav[user] == self._v_creator[video][:, None]).any(axis=1)
        affinity = UV_WEIGHT * uv + self._v_quality[video] + FAV_CREATOR_BONUS * fav
        watched = rng.random(n) < _sigmoid(affinity - POSITION_PENALTY * position + WATCH_BIAS + demand)
        inflation = INFLATION_SHIFT if self._drifted(index, "watch_time_inflation") else 0.0
        mean = _sigmoid(FRACTION_BIAS + FRACTION_WEIGHT * affinity + inflation)
        fraction = rng.beta(mean * FRACTION_CONCENTRATION, (1.0 - mean) * FRACTION_CONCENTRATION)
        duration = self._v_duration[video]
        # at least 1 s (a watched impression never reads as unwatched), at most the duration
        watched_s = np.round(fraction * duration, 1)
        watched_s = np.minimum(np.maximum(watched_s, np.minimum(1.0, duration)), duration)
        watched_s = np.where(watched, watched_s, 0.0)
        completed = watched & (watched_s >= 0.9 * duration)
        liked = watched & (rng.random(n) < _sigmoid(LIKE_BIAS + 1.0 * affinity + 1.5 * fraction))
        return watched_s, completed, liked

    def _events(
        self, rng: np.random.Generator, index: int, day_start: int, day_end: int, first_new_user: int
    ) -> pa.Table:
        # One generator for the three parts, in this order: the same seed gives the same tables.
        s = self._draw_sessions(rng, index, day_start, day_end, first_new_user)
        sess, position = s.rows()
        user = s.user[sess]
        t = s.start_us[sess] + position * s.gap_us[sess]
        video = self._choose_videos(rng, index, day_start, user, t)
        watched_s, completed, liked = self._respond(rng, index, user, video, position)

        n = len(user)
        order = np.argsort(t, kind="stable")
        seq = _ids(f"e{index:05d}-", np.arange(n), 8)
        user_ids = _ids("u", user[order], 7)
        vid_ids = _ids("v", video[order], 7)
        return pa.Table.from_arrays(
            [
                seq,
                user_ids,
                vid_ids,
                _timestamps(t[order]),
                pa.array(SURFACES, pa.string()).take(pa.array(s.surface[sess][order])),
                pa.array(position[order].astype(np.int32), pa.int32()),
                pa.array(watched_s[order], pa.float64()),
                pa.array(completed[order], pa.bool_()),
                pa.array(liked[order], pa.bool_()),
            ],
            schema=EVENTS.schema,
        )

    # --- closed loop: the platform chooses the videos ----------------------------------------------

    def sessions(self, index: int) -> "Sessions":
        """Who is active when on day `index`, with each session's slate length and surface: exactly the
        sessions of the open loop's day (same generator, same draws), in the order they were drawn.

        Brings the population to day `index` first when it is not there (`arrivals`), and restarts the
        day's response stream, so a day replayed in the same order responds the same way."""
        self._at_day(index)
        c = self.config
        day_start = _us(c.date_of(index))
        rng = np.random.default_rng([c.seed, index, 1])
        s = self._draw_sessions(rng, index, day_start, day_start + US_PER_DAY, self._first_new_user)
        self._response_rng = (index, np.random.default_rng([c.seed, index, 5]))
        return s

    def respond(
        self,
        index: int,
        users: Sequence[str] | np.ndarray,
        videos: Sequence[str] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        times: Sequence[int] | np.ndarray | None = None,
    ) -> Response:
        """How users respond on day `index` to the videos a platform showed them: the ground truth of the
        open loop (affinity = w * u.v + quality + favourite creator, position bias, watched fraction and
        like, the `watch_time_inflation` drift) plus what the open loop expresses through exposure and a
        closed loop must express through response: the freshness of a video at `times` (microseconds
        since the epoch; default noon of the day) raises the watch logit by
        ``CLOSED_FRESHNESS_WEIGHT * log(freshness)``, and under `category_surge` the surge category's by
        ``log(SURGE_FACTOR)`` from the drift day on. (`new_user_wave` and `device_shift` act on who is
        active: `sessions`.)

        `users`/`videos` are ids ("u0000012", "v0000034") or population rows. Draws continue the day's
        response stream (restarted by `sessions(index)`): call in session order for reproducible days.
        """
        self._at_day(index)
        user = self._rows(users, "u", self.n_users, "user")
        video = self._rows(videos, "v", self.n_videos, "video")
        position = np.asarray(positions, dtype=np.int64)
        if not len(user) == len(video) == len(position):
            raise ValueError(f"users, videos and positions differ in length: {len(user)}, {len(video)}, {len(position)}")
        day_start = _us(self.config.date_of(index))
        at = np.full(len(video), day_start + US_PER_DAY // 2, np.int64) if times is None else np.asarray(times, np.int64)
        demand = CLOSED_FRESHNESS_WEIGHT * np.log(self._freshness(at, video))
        if self._drifted(index, "category_surge"):
            demand = demand + np.log(SURGE_FACTOR) * (self._v_cat[video] == self.surge_category_index)
        if self._response_rng is None or self._response_rng[0] != index:
            self._response_rng = (index, np.random.default_rng([self.config.seed, index, 5]))
        watched_s, completed, liked = self._respond(self._response_rng[1], index, user, video, position, demand)
        return Response(watched_s, completed, liked)

    def user_context(self, users: Sequence[str] | np.ndarray) -> list[dict[str, str]]:
        """What an app knows about each user (their country and device), as a recommendation context."""
        rows = self._rows(users, "u", self.n_users, "user")
        return [{"country": COUNTRIES[c], "device": DEVICES[d]}
                for c, d in zip(self._u_country[rows].tolist(), self._u_device[rows].tolist())]

    def video_rows(self, videos: Sequence[str] | np.ndarray) -> np.ndarray:
        """Population rows of video ids ("v0000034" -> 34); raises ValueError naming an unknown one."""
        return self._rows(videos, "v", self.n_videos, "video")

    def day_start_us(self, index: int) -> int:
        """00:00 UTC of day `index`, in microseconds since the epoch."""
        return _us(self.config.date_of(index))

    def catalog_size(self, before_us: int) -> int:
        """How many videos were uploaded before `before_us` (what a platform can know of)."""
        return int((self._v_upload < before_us).sum())

    @staticmethod
    def _rows(ids: Sequence[str] | np.ndarray, prefix: str, n: int, what: str) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.dtype.kind in "iu":
            rows = arr.astype(np.int64)
        else:
            try:
                rows = np.asarray([int(str(x)[len(prefix):]) if str(x).startswith(prefix) else -1 for x in arr],
                                  np.int64)
            except ValueError:
                rows = np.full(len(arr), -1, np.int64)
        bad = (rows < 0) | (rows >= n)
        if bad.any():
            raise ValueError(f"unknown {what} id {str(arr[np.flatnonzero(bad)[0]])!r}: not in the simulated population")
        return rows


@dataclass(frozen=True)
class Sessions:
    """One day's sessions (numpy arrays, one entry per session, in draw order): the user's population
    row, the slate length, the surface (index into `SURFACES`), the first impression's time and the gap
    between consecutive impressions (microseconds)."""

    day: int
    user: np.ndarray
    length: np.ndarray
    surface: np.ndarray
    start_us: np.ndarray
    gap_us: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(session of each impression, its position) for full slates: one row per impression."""
        n = int(self.length.sum())
        sess = np.repeat(np.arange(len(self.user)), self.length)
        position = np.arange(n) - np.repeat(np.cumsum(self.length) - self.length, self.length)
        return sess, position

    def user_id(self, i: int) -> str:
        return f"u{int(self.user[i]):07d}"

    def surface_name(self, i: int) -> str:
        return SURFACES[int(self.surface[i])]

    def times(self, i: int, positions: np.ndarray) -> np.ndarray:
        """When session `i` shows the items at `positions` (microseconds since the epoch)."""
        return self.start_us[i] + np.asarray(positions, np.int64) * self.gap_us[i]


@dataclass(frozen=True)
class Response:
    """What users did with impressions: watched seconds (0 = not watched), completed, liked."""

    watched_s: np.ndarray
    completed: np.ndarray
    liked: np.ndarray

    @property
    def watched(self) -> np.ndarray:
        return self.watched_s > 0


# --- writing to the landing zone -------------------------------------------------------------------


def table_to_csv(table: pa.Table) -> bytes:
    """CSV bytes: header row, UTF-8, ISO-8601 UTC timestamps (``2025-01-01T08:30:00.000000Z``), true/false."""
    cols = []
    for f, col in zip(table.schema, table.columns):
        if pa.types.is_timestamp(f.type):
            col = pc.strftime(col, format="%Y-%m-%dT%H:%M:%SZ")
        cols.append(col)
    buf = io.BytesIO()
    pacsv.write_csv(pa.Table.from_arrays(cols, names=table.column_names), buf)
    return buf.getvalue()


def write_landing_table(
    landing: Lake, name: str, partition: str, table: pa.Table, fmt: str = "parquet"
) -> str:
    """Write one day of one table into the landing zone as ``{name}/date={partition}/part-0.{fmt}``.

    The file replaces the partition's previous content (any file of the other format is removed).
    Returns the file's URI.
    """
    if fmt == "parquet":
        return landing.write_partition(name, partition, table).uri
    if fmt != "csv":
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    prefix = partition_key(name, partition)
    key = f"{prefix}/part-0.csv"
    for stale in landing.list_keys(prefix + "/"):
        if stale != key:
            landing.delete_prefix(stale)
    return landing.write_bytes(key, table_to_csv(table))


@dataclass
class SimSummary:
    """What `simulate` wrote: rows per table per day, totals and wall time."""

    config: SimConfig
    fmt: str
    dates: list[str] = field(default_factory=list)
    rows: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in TABLE_ORDER})
    seconds: float = 0.0

    @property
    def totals(self) -> dict[str, int]:
        return {name: int(sum(counts)) for name, counts in self.rows.items()}

    @property
    def events_per_second(self) -> float:
        return self.totals["events"] / self.seconds if self.seconds > 0 else float("inf")

    def per_day(self) -> list[dict[str, object]]:
        return [
            {"date": d, **{name: self.rows[name][i] for name in TABLE_ORDER}}
            for i, d in enumerate(self.dates)
        ]


def simulate(config: SimConfig, landing: Lake, fmt: str = "parquet") -> SimSummary:
    """Simulate `config.days` days and write each day's three tables into the `landing` lake.

    Layout: ``{table}/date=YYYY-MM-DD/part-0.parquet`` (or ``part-0.csv``). Only one day is held in
    memory at a time.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    began = time.perf_counter()
    summary = SimSummary(config=config, fmt=fmt)
    sim = Simulator(config)
    for index in range(config.days):
        partition = config.date_of(index).isoformat()
        tables = sim.day(index)
        for name in TABLE_ORDER:
            write_landing_table(landing, name, partition, tables[name], fmt)
            summary.rows[name].append(tables[name].num_rows)
        summary.dates.append(partition)
        del tables
    summary.seconds = time.perf_counter() - began
    return summary


def simulate_validated(config: SimConfig, lake: Lake) -> list[str]:
    """Simulate straight into a lake's `silver/*` (simulated rows are what validation accepts) and
    compute each day's feature snapshots: the state after the data plane, for tests and benchmarks of
    what comes after it. Returns the days, in order."""
    from recloop.features import compute_features

    sim = Simulator(config)
    days = [config.date_of(i).isoformat() for i in range(config.days)]
    for i, day in enumerate(days):
        tables = sim.day(i)
        for name in TABLE_ORDER:
            lake.write_partition(f"silver/{name}", day, tables[name])
    for day in days:
        compute_features(lake, day)
    return days
