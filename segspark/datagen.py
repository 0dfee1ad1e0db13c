"""Synthetic clickstream with planted personas (`segspark generate`).

Users are generated in blocks of BLOCK_USERS consecutive ids. Each block draws from its own numpy
Generator seeded by (seed, block), inside `mapInPandas` on the executors: generation is parallel,
nothing per user or per event runs on the driver, and the data depend only on the seed and the
number of users, never on how Spark partitions the blocks.

Personas differ in visit frequency, recency, session length and duration, funnel conversion,
price level, time of day and category mix; every user draws their own rates around the persona's
(log-normal spread), so personas overlap as real customers do. The output follows the public
REES46 e-commerce layout: event_time ("yyyy-MM-dd HH:mm:ss", UTC), event_type (view, cart,
remove_from_cart, purchase), product_id, category_code, brand, price, user_id, user_session.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

log = logging.getLogger(__name__)

BLOCK_USERS = 1000

EVENT_SCHEMA = StructType(
    [
        StructField("event_time", StringType(), False),
        StructField("event_type", StringType(), False),
        StructField("product_id", LongType(), False),
        StructField("category_code", StringType(), False),
        StructField("brand", StringType(), False),
        StructField("price", DoubleType(), True),
        StructField("user_id", LongType(), False),
        StructField("user_session", StringType(), False),
    ]
)
EVENT_COLUMNS = [f.name for f in EVENT_SCHEMA.fields]
TRUTH_SCHEMA = StructType([StructField("user_id", LongType(), False), StructField("persona", StringType(), False)])
LINE_SCHEMA = StructType([StructField("value", StringType(), False)])

CATEGORIES = (
    "electronics.smartphone",
    "computers.notebook",
    "appliances.kitchen",
    "apparel.shoes",
    "home.furniture",
    "kids.toys",
    "sport.bicycle",
    "beauty.skincare",
    "games.console",
    "grocery.snacks",
)
BRANDS = ("acme", "globex", "initech", "umbrella", "stark", "wayne", "hooli", "vehement")


@dataclass(frozen=True)
class Persona:
    name: str
    share: float
    sessions_per_week: float  # visit frequency while active
    first_active: tuple[float, float]  # when the user starts, as a fraction of the window
    last_gap_days: tuple[float, float]  # days between the last visit and the end of the data
    events_per_session: float
    seconds_between_events: float
    cart_rate: float  # share of browsing events that are add-to-cart
    remove_rate: float  # share of browsing events that are remove-from-cart
    buy_session_rate: float  # share of sessions that end in a purchase
    items_per_order: float
    median_price: float
    hour: float  # preferred local hour of day (UTC here)
    hour_spread: float
    categories: dict[str, float]  # category preference weights (others get a small base weight)


PERSONAS_SPEC: tuple[Persona, ...] = (
    Persona("window_shopper", 0.20, 0.65, (0.0, 0.5), (0, 10), 9, 70, 0.04, 0.01, 0.01, 1.1, 45, 20, 2.0,
            {"apparel.shoes": 4, "home.furniture": 3, "beauty.skincare": 2}),
    Persona("bargain_hunter", 0.20, 0.5, (0.0, 0.5), (0, 20), 7, 40, 0.22, 0.03, 0.35, 3.0, 7, 13, 2.5,
            {"grocery.snacks": 4, "kids.toys": 3, "home.furniture": 1}),
    Persona("loyal_high_spender", 0.15, 1.0, (0.0, 0.2), (0, 3), 5, 30, 0.25, 0.02, 0.6, 1.5, 220, 10, 1.5,
            {"electronics.smartphone": 4, "computers.notebook": 4, "appliances.kitchen": 2}),
    Persona("cart_abandoner", 0.15, 0.5, (0.0, 0.6), (0, 15), 7, 45, 0.35, 0.22, 0.03, 1.2, 70, 21, 1.5,
            {"sport.bicycle": 3, "apparel.shoes": 3, "electronics.smartphone": 1}),
    Persona("one_time_buyer", 0.15, 0.0, (0.0, 0.7), (20, 80), 5, 50, 0.15, 0.02, 1.0, 1.0, 35, 15, 3.0,
            {"home.furniture": 2, "kids.toys": 2, "beauty.skincare": 2}),
    Persona("night_owl_browser", 0.15, 0.75, (0.0, 0.4), (0, 7), 8, 90, 0.07, 0.02, 0.08, 1.1, 25, 1.5, 1.2,
            {"games.console": 5, "electronics.smartphone": 2}),
)
PERSONAS: tuple[str, ...] = tuple(p.name for p in PERSONAS_SPEC)


@dataclass(frozen=True)
class GenerateSpec:
    users: int
    days: int = 90
    seed: int = 42
    end_date: dt.date = dt.date(2026, 10, 31)  # last day of data (UTC)
    duplicate_share: float = 0.0  # share of events emitted twice, exactly
    missing_price_share: float = 0.0  # share of events with price null
    malformed_share: float = 0.0  # share of extra malformed lines (json/csv only)
    partitions: int | None = None  # None: derived from the number of users

    def __post_init__(self):
        if self.users < 1 or self.days < 1:
            raise ValueError(f"users and days must be at least 1, got users={self.users} days={self.days}")
        for name in ("duplicate_share", "missing_price_share", "malformed_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")

    @property
    def blocks(self) -> int:
        return -(-self.users // BLOCK_USERS)

    def num_partitions(self) -> int:
        return self.partitions or max(2, min(self.blocks, 2 * (self.blocks // 10 + 1)))


def _rng(spec: GenerateSpec, block: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, block])


def _block_personas(spec: GenerateSpec, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, persona index) of one block. Always the first draws of the block's generator."""
    first = block * BLOCK_USERS
    ids = np.arange(first, min(first + BLOCK_USERS, spec.users), dtype=np.int64) + 1
    shares = np.array([p.share for p in PERSONAS_SPEC])
    persona = rng.choice(len(PERSONAS_SPEC), size=len(ids), p=shares / shares.sum())
    return ids, persona


def _param(persona: np.ndarray, attr: str) -> np.ndarray:
    return np.array([getattr(p, attr) for p in PERSONAS_SPEC], dtype=float)[persona]


def _jitter(rng: np.random.Generator, values: np.ndarray, sigma: float) -> np.ndarray:
    """Per-user variation around the persona's value (log-normal, median preserved)."""
    return values * rng.lognormal(0.0, sigma, size=len(values))


def _category_weights() -> np.ndarray:
    weights = np.full((len(PERSONAS_SPEC), len(CATEGORIES)), 0.15)
    for i, persona in enumerate(PERSONAS_SPEC):
        for name, weight in persona.categories.items():
            weights[i, CATEGORIES.index(name)] = weight
    return weights


def generate_block(spec: GenerateSpec, block: int) -> pd.DataFrame:
    """All events of one block of users (deterministic for (seed, block))."""
    rng = _rng(spec, block)
    ids, persona = _block_personas(spec, block, rng)
    n_users, days = len(ids), float(spec.days)

    # Activity span: first and last visit day (fractional days from the window start).
    lo, hi = (np.array([p.first_active[k] for p in PERSONAS_SPEC])[persona] for k in (0, 1))
    first = rng.uniform(lo, hi) * days
    gap_lo, gap_hi = (np.array([p.last_gap_days[k] for p in PERSONAS_SPEC])[persona] for k in (0, 1))
    last = np.maximum(days - rng.uniform(np.minimum(gap_lo, days), np.minimum(gap_hi, days)), first)
    one_timer = _param(persona, "sessions_per_week") == 0
    last = np.where(one_timer, np.minimum(first + rng.uniform(0, 2, n_users), days), last)

    weeks = (last - first) / 7.0
    rate = _jitter(rng, _param(persona, "sessions_per_week"), 0.3)
    sessions = 1 + rng.poisson(rate * weeks)
    sessions = np.where(one_timer, 1 + (rng.random(n_users) < 0.3), sessions)

    # Per-user behaviour around the persona's.
    events_mean = _jitter(rng, _param(persona, "events_per_session"), 0.25)
    gap_mean = _jitter(rng, _param(persona, "seconds_between_events"), 0.3)
    cart_rate = np.clip(_jitter(rng, _param(persona, "cart_rate"), 0.25), 0, 0.9)
    remove_rate = np.clip(_jitter(rng, _param(persona, "remove_rate"), 0.25), 0, 0.9 - cart_rate)
    buy_rate = np.clip(_jitter(rng, _param(persona, "buy_session_rate"), 0.25), 0, 1)
    items = _param(persona, "items_per_order")
    price_level = _jitter(rng, _param(persona, "median_price"), 0.25)
    hour = _param(persona, "hour") + rng.normal(0, 1.0, n_users)
    hour_spread = _param(persona, "hour_spread")
    cat_weights = _category_weights()[persona] * rng.lognormal(0, 0.4, (n_users, len(CATEGORIES)))
    cat_cdf = np.cumsum(cat_weights / cat_weights.sum(axis=1, keepdims=True), axis=1)

    # Sessions: user index per session, start time, length, purchase flag.
    s_user = np.repeat(np.arange(n_users), sessions)
    s_index = np.arange(len(s_user)) - np.repeat(np.cumsum(sessions) - sessions, sessions)
    n_sessions = len(s_user)
    # The last session sits on the last active day so that recency follows the persona.
    s_day = np.where(
        s_index == sessions[s_user] - 1,
        last[s_user],
        first[s_user] + rng.random(n_sessions) * (last - first)[s_user],
    )
    s_day = np.minimum(np.floor(s_day), days - 1)
    s_hour = np.mod(hour[s_user] + rng.normal(0, hour_spread[s_user]), 24.0)
    s_start = s_day * 86_400 + s_hour * 3600
    s_events = 1 + rng.poisson(np.maximum(events_mean[s_user] - 1, 0))
    s_buys = rng.random(n_sessions) < buy_rate[s_user]
    s_buys = np.where(one_timer[s_user], s_index == 0, s_buys)  # a one-time buyer buys on the first visit
    s_items = np.where(s_buys, np.minimum(1 + rng.poisson(items[s_user] - 1), s_events), 0)
    s_events = np.maximum(s_events, s_items + 1)  # at least one view before buying

    # Events.
    e_session = np.repeat(np.arange(n_sessions), s_events)
    e_pos = np.arange(len(e_session)) - np.repeat(np.cumsum(s_events) - s_events, s_events)
    e_user = s_user[e_session]
    n_events = len(e_session)
    gaps = rng.exponential(gap_mean[e_user]) * (e_pos > 0)
    offsets = np.cumsum(gaps)
    offsets -= np.repeat(offsets[np.cumsum(s_events) - s_events], s_events)
    seconds = np.minimum(s_start[e_session] + offsets, days * 86_400 - 1)

    u = rng.random(n_events)
    kind = np.where(u < cart_rate[e_user], 1, np.where(u < cart_rate[e_user] + remove_rate[e_user], 2, 0))
    is_purchase = e_pos >= (s_events - s_items)[e_session]
    kind = np.where(is_purchase, 3, kind)
    types = np.array(["view", "cart", "remove_from_cart", "purchase"])[kind]

    category = (rng.random(n_events)[:, None] > cat_cdf[e_user]).sum(axis=1)
    category = np.minimum(category, len(CATEGORIES) - 1)
    price = np.round(price_level[e_user] * rng.lognormal(0, 0.35, n_events), 2)
    product = category.astype(np.int64) * 1_000_000 + rng.integers(0, 5000, n_events)
    brand = np.array(BRANDS)[product % len(BRANDS)]

    start = np.datetime64(spec.end_date - dt.timedelta(days=spec.days - 1), "s")
    times = np.datetime_as_string(start + seconds.astype("timedelta64[s]"), unit="s")
    session_ids = np.char.add(np.char.add(ids[s_user].astype(str), "-"), s_index.astype(str))
    events = pd.DataFrame(
        {
            "event_time": np.char.replace(times, "T", " "),
            "event_type": types,
            "product_id": product,
            "category_code": np.array(CATEGORIES)[category],
            "brand": brand,
            "price": price,
            "user_id": ids[e_user],
            "user_session": session_ids[e_session],
        }
    )
    return _add_noise(spec, rng, events)


def _add_noise(spec: GenerateSpec, rng: np.random.Generator, events: pd.DataFrame) -> pd.DataFrame:
    if spec.missing_price_share > 0:
        missing = rng.random(len(events)) < spec.missing_price_share
        events["price"] = events["price"].mask(missing)
    if spec.duplicate_share > 0:
        copies = events[rng.random(len(events)) < spec.duplicate_share]
        events = pd.concat([events, copies], ignore_index=True)
    return events


def _malformed_lines(spec: GenerateSpec, rng: np.random.Generator, lines: list[str], fmt: str) -> list[str]:
    count = int(rng.binomial(len(lines), spec.malformed_share)) if spec.malformed_share > 0 and lines else 0
    picks = rng.integers(0, len(lines), count)
    if fmt == "json":
        return [lines[i][: max(5, len(lines[i]) // 3)] for i in picks]  # truncated JSON
    return [",".join(lines[i].split(",")[:3]) for i in picks]  # too few CSV fields


def _to_lines(spec: GenerateSpec, block: int, events: pd.DataFrame, fmt: str) -> list[str]:
    if fmt == "json":
        text = events.to_json(orient="records", lines=True)
        lines = text.splitlines()
    else:
        price = events["price"].map(lambda x: "" if pd.isna(x) else repr(float(x)))
        cols = [events[c].astype(str) for c in EVENT_COLUMNS if c != "price"]
        frame = pd.concat(cols[:5] + [price] + cols[5:], axis=1)
        lines = frame.apply(lambda row: ",".join(row.values), axis=1).tolist() if len(frame) else []
    noise_rng = np.random.default_rng([spec.seed, block, 7])
    bad = _malformed_lines(spec, noise_rng, lines, fmt)
    if bad:
        positions = noise_rng.integers(0, len(lines) + 1, len(bad))
        for pos, line in sorted(zip(positions, bad, strict=True), reverse=True):
            lines.insert(int(pos), line)
    return lines


def _blocks(spark: SparkSession, spec: GenerateSpec) -> DataFrame:
    return spark.range(0, spec.blocks, 1, spec.num_partitions()).withColumnRenamed("id", "block")


def generate_events(spark: SparkSession, spec: GenerateSpec) -> tuple[DataFrame, DataFrame]:
    """(events, truth) as DataFrames; evaluated lazily on the executors."""

    def events(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for block in batch["block"].tolist():
                yield generate_block(spec, int(block))

    def truth(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for block in batch["block"].tolist():
                ids, persona = _block_personas(spec, int(block), _rng(spec, int(block)))
                yield pd.DataFrame({"user_id": ids, "persona": np.array(PERSONAS)[persona]})

    blocks = _blocks(spark, spec)
    return blocks.mapInPandas(events, EVENT_SCHEMA), blocks.mapInPandas(truth, TRUTH_SCHEMA)


def _text_lines(spark: SparkSession, spec: GenerateSpec, fmt: str) -> DataFrame:
    """Events as json/csv text lines with malformed lines mixed in; csv files start with a header."""
    header = ",".join(EVENT_COLUMNS)

    def lines(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        if fmt == "csv":
            yield pd.DataFrame({"value": [header]})  # first line of this partition's file
        for batch in batches:
            for block in batch["block"].tolist():
                text = _to_lines(spec, int(block), generate_block(spec, int(block)), fmt)
                yield pd.DataFrame({"value": text})

    return _blocks(spark, spec).mapInPandas(lines, LINE_SCHEMA)


def write_dataset(spark: SparkSession, spec: GenerateSpec, out_dir: str, fmt: str = "parquet") -> dict:
    """Write out_dir/events/ (parquet, json or csv) and out_dir/truth/ (parquet)."""
    if fmt not in ("parquet", "json", "csv"):
        raise ValueError(f"format {fmt!r} is not one of parquet, json, csv")
    if spec.malformed_share > 0 and fmt == "parquet":
        raise ValueError("malformed lines need a text format: use --format json or csv")
    events, truth = generate_events(spark, spec)
    target = f"{out_dir.rstrip('/')}/events"
    if fmt == "parquet":
        events.write.mode("overwrite").parquet(target)
    else:
        _text_lines(spark, spec, fmt).write.mode("overwrite").text(target)
    truth.write.mode("overwrite").parquet(f"{out_dir.rstrip('/')}/truth")
    personas = {
        row.persona: int(row["count"])
        for row in spark.read.parquet(f"{out_dir.rstrip('/')}/truth").groupBy("persona").count().collect()
    }
    summary: dict = {"users": spec.users, "days": spec.days, "seed": spec.seed, "personas": dict(sorted(personas.items()))}
    if fmt == "parquet":
        summary["events"] = spark.read.parquet(target).count()  # from Parquet footers: cheap
    log.info("generated %s users into %s (%s)", f"{spec.users:,}", out_dir, fmt)
    return summary


