"""Synthetic clickstream with planted personas (`segspark generate`).

Users are generated in blocks of BLOCK_USERS consecutive ids. Each block draws from its own numpy
Generator seeded by (seed, block), inside `mapInPandas` on the executors: generation is parallel,
nothing per user or per event runs on the driver, memory per task is bounded by one block (about
50k events), and the data depend only on the seed and the number of users, never on how Spark
partitions the blocks. A small sample on a local path is drawn from the same blocks by the driver
alone (`datagen_local`), which writes the same files without starting Spark.

Personas differ in visit frequency, recency, session length and duration, funnel conversion,
price level, time of day and category mix; every user draws their own rates around the persona's
(log-normal spread), so personas overlap as real customers do while their centres stay apart.
The output follows the public REES46 e-commerce layout: event_time ("yyyy-MM-dd HH:mm:ss", UTC),
event_type (view, cart, remove_from_cart, purchase), product_id, category_code, brand, price,
user_id, user_session. A product always has the same category, brand and price, and every
purchased item was added to the cart earlier in the same session.

Layout `invoices` (GenerateSpec.layout) writes the same users' purchases as invoice lines in the
UCI Online Retail layout (InvoiceNo, StockCode, Description, Quantity, InvoiceDate, UnitPrice,
CustomerID, Country; conf/generated_invoices.yaml reads it): one invoice per session with a purchase,
per-persona country mixes and cancellations ("C" invoices, negative quantities) at the persona's
return_rate. Its extra draws come from a generator of their own, so the rees46 output is unchanged.
Users who never buy have no invoice line, and the truth then lists only the customers.

Noise (all deterministic for the seed): exact duplicate rows, null prices, and for json/csv extra
malformed lines (truncated records, wrong field counts, garbage) mixed into the same files.
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

from segspark.errors import UsageError
from segspark.io.files import path_exists

log = logging.getLogger(__name__)

BLOCK_USERS = 1000
SECONDS_PER_DAY = 86_400

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
LAYOUTS = ("rees46", "invoices")
# Invoice lines in the layout of the UCI "Online Retail" data set (conf/online_retail.yaml reads it;
# CustomerID is a float there, written like 17850.0, as pandas exports the real file).
INVOICE_SCHEMA = StructType(
    [
        StructField("InvoiceNo", StringType(), False),
        StructField("StockCode", StringType(), False),
        StructField("Description", StringType(), False),
        StructField("Quantity", LongType(), False),
        StructField("InvoiceDate", StringType(), False),
        StructField("UnitPrice", DoubleType(), True),
        StructField("CustomerID", DoubleType(), False),
        StructField("Country", StringType(), False),
    ]
)
INVOICE_COLUMNS = [f.name for f in INVOICE_SCHEMA.fields]
_PANDAS_TYPES = {StringType: object, LongType: np.int64, DoubleType: float}
INVOICE_FIRST_NUMBER = 100_000
# Customers' countries when a persona names none (about the real data's mix of customers).
COUNTRY_MIX = {"United Kingdom": 0.9, "Germany": 0.03, "France": 0.03, "EIRE": 0.02, "Spain": 0.01, "Netherlands": 0.01}
EVENT_TYPES = ("view", "cart", "remove_from_cart", "purchase")

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
BRANDS = ("acme", "globex", "initech", "umbrella", "stark", "wayne", "hooli", "vehement", "soylent", "tyrell")

# Products: within a category, a price point (a step of 5% on a log scale from 1.00) and one of
# PRODUCTS_PER_PRICE products at that price. product_id = category * 1e6 + price step * 1e3 + n.
PRICE_STEPS_PER_E = 20
PRICE_STEPS = 200  # prices 1.00 .. about 20,000
PRODUCTS_PER_PRICE = 1000


@dataclass(frozen=True)
class Persona:
    name: str
    share: float
    sessions_per_week: float  # visit frequency while active (0: a single visit)
    first_active: tuple[float, float]  # start of activity, as a fraction of the window
    last_gap: tuple[float, float]  # end of the window minus the last visit, as a fraction of the window
    events_per_session: float
    seconds_between_events: float  # session duration = events x this
    cart_rate: float  # share of browsing events that are add-to-cart
    remove_rate: float  # share of browsing events that are remove-from-cart
    buy_session_rate: float  # share of sessions that end in a purchase
    items_per_order: float
    median_price: float
    hour: float  # preferred hour of day (UTC)
    hour_spread: float
    categories: dict[str, float]  # category preference weights (others get a small base weight)
    # Invoice layout only (the clickstream never reads these):
    return_rate: float = 0.03  # share of purchased lines cancelled later
    countries: dict[str, float] | None = None  # country mix of the persona's customers (None: COUNTRY_MIX)


# fmt: off
PERSONAS_SPEC: tuple[Persona, ...] = (
    # Long evening browsing sessions (fashion, furniture), mid prices; practically never buys.
    Persona("window_shopper", 0.20, sessions_per_week=0.45, first_active=(0.0, 0.3), last_gap=(0.0, 0.08),
            events_per_session=10, seconds_between_events=80, cart_rate=0.03, remove_rate=0.01,
            buy_session_rate=0.002, items_per_order=1.0, median_price=60, hour=20.5, hour_spread=1.5,
            categories={"apparel.shoes": 4, "home.furniture": 3, "beauty.skincare": 2}, return_rate=0.1),
    # Afternoon stock-up visits: cheap groceries and toys, compares (carts, removes), big baskets.
    Persona("bargain_hunter", 0.20, sessions_per_week=0.6, first_active=(0.0, 0.3), last_gap=(0.0, 0.06),
            events_per_session=7, seconds_between_events=35, cart_rate=0.15, remove_rate=0.06,
            buy_session_rate=0.8, items_per_order=3.0, median_price=6, hour=14.5, hour_spread=1.5,
            categories={"grocery.snacks": 4, "kids.toys": 3, "home.furniture": 1}, return_rate=0.02,
            countries={"United Kingdom": 0.9, "EIRE": 0.06, "Spain": 0.02, "France": 0.02}),
    # The most frequent visitor and buyer: short decisive morning sessions, premium electronics,
    # active until the end of the window.
    Persona("loyal_high_spender", 0.15, sessions_per_week=1.2, first_active=(0.0, 0.15), last_gap=(0.0, 0.03),
            events_per_session=5, seconds_between_events=30, cart_rate=0.05, remove_rate=0.01,
            buy_session_rate=0.65, items_per_order=1.2, median_price=250, hour=8.0, hour_spread=1.3,
            categories={"electronics.smartphone": 4, "computers.notebook": 4, "appliances.kitchen": 2}, return_rate=0.03,
            countries={"United Kingdom": 0.7, "Germany": 0.12, "Switzerland": 0.06, "Netherlands": 0.06, "France": 0.06}),
    # Late-afternoon sessions that fill and empty the cart (sport, shoes); almost never checks out.
    Persona("cart_abandoner", 0.15, sessions_per_week=0.65, first_active=(0.0, 0.3), last_gap=(0.0, 0.12),
            events_per_session=7, seconds_between_events=45, cart_rate=0.38, remove_rate=0.25,
            buy_session_rate=0.004, items_per_order=1.0, median_price=90, hour=17.0, hour_spread=1.5,
            categories={"sport.bicycle": 3, "apparel.shoes": 3, "electronics.smartphone": 1}, return_rate=0.12),
    # One purchase after one to three visits within a few days, long ago: lapsed.
    Persona("one_time_buyer", 0.15, sessions_per_week=0.0, first_active=(0.05, 0.4), last_gap=(0.0, 0.0),
            events_per_session=8, seconds_between_events=50, cart_rate=0.1, remove_rate=0.02,
            buy_session_rate=1.0, items_per_order=1.0, median_price=35, hour=12.0, hour_spread=1.5,
            categories={"home.furniture": 2, "kids.toys": 2, "beauty.skincare": 2}, return_rate=0.08,
            countries={"United Kingdom": 0.85, "France": 0.08, "Spain": 0.04, "Belgium": 0.03}),
    # Many short sessions between midnight and 4am (games), an occasional small purchase.
    Persona("night_owl_browser", 0.15, sessions_per_week=2.0, first_active=(0.0, 0.3), last_gap=(0.0, 0.05),
            events_per_session=3, seconds_between_events=60, cart_rate=0.08, remove_rate=0.02,
            buy_session_rate=0.15, items_per_order=1.0, median_price=25, hour=1.5, hour_spread=1.2,
            categories={"games.console": 5, "electronics.smartphone": 2}, return_rate=0.05,
            countries={"United Kingdom": 0.8, "Australia": 0.08, "EIRE": 0.06, "Portugal": 0.06}),
)
# fmt: on
PERSONAS: tuple[str, ...] = tuple(p.name for p in PERSONAS_SPEC)


@dataclass(frozen=True)
class Blur:
    """How far each user strays from their persona: log-normal sigmas (median preserved), except
    `hour`, a normal spread in hours, and `category`, the sigma of each category's weight."""

    rate: float = 0.3
    events: float = 0.2
    gap: float = 0.25
    funnel: float = 0.2
    price: float = 0.25
    hour: float = 0.75
    category: float = 0.4
    base_category_weight: float = 0.15  # of the categories a persona does not name


@dataclass(frozen=True)
class PersonaSet:
    """Personas, the category tree they shop in, and the per-user blur around them."""

    name: str
    personas: tuple[Persona, ...]
    categories: tuple[str, ...]
    blur: Blur
    description: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.personas)


# A deep category tree whose top levels every persona shares: personas differ below the top level.
DEEP_CATEGORIES = (
    "electronics.audio.headphone",
    "electronics.smartphone.android",
    "electronics.video.tv",
    "computers.notebook.ultrabook",
    "computers.components.gpu",
    "home.kitchen.cookware",
    "home.furniture.sofa",
    "home.decor.lamp",
    "apparel.shoes.sneakers",
    "apparel.clothing.dress",
    "kids.toys.lego",
    "kids.clothing.baby",
    "sport.bicycle.mtb",
    "sport.fitness.yoga",
)

# fmt: off
# Overlapping personas: each is a mix of five traits with two or three levels each: visit rate
# (0.3 or 1.5 a week), session length (3.5 or 10 events), funnel (browses, compares in the cart, or
# buys), price level (12, 50 or 200) and time of day (midday, evening, night). Every level is
# shared by two or three personas and every top-level category by several; some pairs differ in
# only two traits, so only the combination tells them apart. With the wide per-user blur below,
# neighbouring personas overlap in every single feature.
OVERLAPPING_SPEC: tuple[Persona, ...] = (
    # rare, long sessions, browses, mid prices, evening; home and fashion
    Persona("evening_browser", 0.20, sessions_per_week=0.3, first_active=(0.0, 0.4), last_gap=(0.0, 0.15),
            events_per_session=10, seconds_between_events=60, cart_rate=0.05, remove_rate=0.02,
            buy_session_rate=0.05, items_per_order=1.0, median_price=50, hour=20.5, hour_spread=1.5,
            categories={"home.decor.lamp": 3, "apparel.clothing.dress": 3, "home.furniture.sofa": 2}, return_rate=0.1,
            countries={"United Kingdom": 0.84, "France": 0.08, "Spain": 0.04, "Belgium": 0.04}),
    # frequent, long sessions, compares, cheap, midday; kids and kitchen
    Persona("family_stocker", 0.18, sessions_per_week=1.5, first_active=(0.0, 0.4), last_gap=(0.0, 0.1),
            events_per_session=10, seconds_between_events=45, cart_rate=0.22, remove_rate=0.12,
            buy_session_rate=0.3, items_per_order=2.0, median_price=12, hour=13.0, hour_spread=1.5,
            categories={"kids.toys.lego": 3, "kids.clothing.baby": 3, "home.kitchen.cookware": 2}, return_rate=0.02,
            countries={"United Kingdom": 0.9, "EIRE": 0.06, "France": 0.02, "Germany": 0.02}),
    # frequent, short sessions, buys, premium, evening; phones, notebooks, audio
    Persona("tech_regular", 0.16, sessions_per_week=1.5, first_active=(0.0, 0.3), last_gap=(0.0, 0.08),
            events_per_session=3.5, seconds_between_events=40, cart_rate=0.12, remove_rate=0.03,
            buy_session_rate=0.55, items_per_order=1.1, median_price=200, hour=20.5, hour_spread=1.5,
            categories={"electronics.smartphone.android": 3, "computers.notebook.ultrabook": 2,
                        "electronics.audio.headphone": 2}, return_rate=0.05,
            countries={"United Kingdom": 0.72, "Germany": 0.12, "Netherlands": 0.06, "Switzerland": 0.05,
                       "France": 0.05}),
    # rare, long sessions, compares, mid prices, midday; sport and shoes
    Persona("hesitant_carter", 0.16, sessions_per_week=0.3, first_active=(0.0, 0.4), last_gap=(0.0, 0.15),
            events_per_session=10, seconds_between_events=55, cart_rate=0.22, remove_rate=0.12,
            buy_session_rate=0.1, items_per_order=1.0, median_price=50, hour=13.0, hour_spread=1.5,
            categories={"sport.bicycle.mtb": 2, "apparel.shoes.sneakers": 3, "sport.fitness.yoga": 2}, return_rate=0.14,
            countries={"United Kingdom": 0.82, "France": 0.08, "Germany": 0.05, "Spain": 0.05}),
    # rare, long sessions, buys, premium, midday; furniture, TV, kitchen
    Persona("considered_buyer", 0.15, sessions_per_week=0.3, first_active=(0.0, 0.5), last_gap=(0.0, 0.25),
            events_per_session=10, seconds_between_events=60, cart_rate=0.12, remove_rate=0.03,
            buy_session_rate=0.55, items_per_order=1.3, median_price=200, hour=13.0, hour_spread=1.5,
            categories={"home.furniture.sofa": 3, "electronics.video.tv": 2, "home.kitchen.cookware": 2}, return_rate=0.04,
            countries={"United Kingdom": 0.78, "Germany": 0.1, "Switzerland": 0.06, "EIRE": 0.06}),
    # frequent, short sessions, browses, cheap, night; gadgets, components, sneakers
    Persona("late_night_scroller", 0.15, sessions_per_week=1.5, first_active=(0.0, 0.4), last_gap=(0.0, 0.1),
            events_per_session=3.5, seconds_between_events=50, cart_rate=0.05, remove_rate=0.02,
            buy_session_rate=0.05, items_per_order=1.0, median_price=12, hour=1.0, hour_spread=1.5,
            categories={"computers.components.gpu": 2, "electronics.audio.headphone": 2,
                        "apparel.shoes.sneakers": 1}, return_rate=0.08,
            countries={"United Kingdom": 0.8, "EIRE": 0.08, "Spain": 0.06, "Portugal": 0.06}),
)
# A persona none of the sets above has, for planting an emerging segment in a stream: models trained on
# the clean set meet users unlike any segment. In the small hours (as only night owls), premium
# prices (as only loyal high spenders, and higher), long sessions (longer than window shoppers')
# that nearly always end in a basket of several items: high-value frequent night-time buyers, far
# from every clean persona in several traits at once.
EMERGING_SPEC: tuple[Persona, ...] = (
    Persona("midnight_splurger", 1.0, sessions_per_week=1.0, first_active=(0.0, 0.3), last_gap=(0.0, 0.05),
            events_per_session=16, seconds_between_events=90, cart_rate=0.05, remove_rate=0.0,
            buy_session_rate=0.9, items_per_order=4.0, median_price=1500, hour=2.5, hour_spread=1.0,
            categories={"beauty.skincare": 4, "apparel.shoes": 2}, return_rate=0.02),
)
# fmt: on

PERSONA_SETS: dict[str, PersonaSet] = {
    "clean": PersonaSet("clean", PERSONAS_SPEC, CATEGORIES, Blur(),
                        "six personas that each differ from the rest in several traits; moderate per-user spread"),
    "overlapping": PersonaSet(
        "overlapping", OVERLAPPING_SPEC, DEEP_CATEGORIES,
        Blur(rate=0.4, events=0.3, gap=0.3, funnel=0.35, price=0.35, hour=1.0, category=0.6,
             base_category_weight=0.3),
        "six personas told apart only by mixtures of shared traits, wide per-user blur, a deep category tree",
    ),
    "emerging": PersonaSet("emerging", EMERGING_SPEC, CATEGORIES, Blur(),
                           "one persona absent from the clean set (its categories and blur): high-value "
                           "night-time buyers, to plant an emerging segment in a stream"),
}


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
    personas: str = "clean"  # a key of PERSONA_SETS
    layout: str = "rees46"  # rees46 (clickstream events) | invoices (invoice lines, Online Retail layout)
    # The first user's id: a set of users that must not meet another set's (e.g. new users streamed
    # after a training run on ids from 1) starts above it. Only the ids move, not the draws.
    first_user_id: int = 1

    def __post_init__(self):
        if self.personas not in PERSONA_SETS:
            raise ValueError(f"personas must be one of {', '.join(PERSONA_SETS)}, got {self.personas!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.users < 1:
            raise ValueError(f"users must be at least 1, got {self.users}")
        if self.days < 1:
            raise ValueError(f"days must be at least 1, got {self.days}")
        if self.first_user_id < 1:
            raise ValueError(f"first_user_id must be at least 1, got {self.first_user_id}")
        if self.partitions is not None and self.partitions < 1:
            raise ValueError(f"partitions must be at least 1 (or None to derive it), got {self.partitions}")
        for name in ("duplicate_share", "missing_price_share", "malformed_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")

    @property
    def persona_set(self) -> PersonaSet:
        return PERSONA_SETS[self.personas]

    @property
    def schema(self) -> StructType:
        """The records' schema in this layout."""
        return INVOICE_SCHEMA if self.layout == "invoices" else EVENT_SCHEMA

    @property
    def invoice_stride(self) -> int:
        """Invoice numbers reserved per block of users (orders and cancellations): about 20 per
        user per 90 days, five times what the busiest persona places."""
        return 20_000 * -(-self.days // 90)

    @property
    def blocks(self) -> int:
        return -(-self.users // BLOCK_USERS)

    @property
    def start_date(self) -> dt.date:
        return self.end_date - dt.timedelta(days=self.days - 1)

    def num_partitions(self) -> int:
        # About 5 blocks (250k events) per partition: few enough files, tasks small enough to balance.
        return self.partitions or max(2, min(self.blocks, 2 * (self.blocks // 10 + 1)))


# --- one block of users (pure numpy/pandas; runs on the executors) -------------------------------


def _rng(spec: GenerateSpec, block: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, block])


def _block_personas(spec: GenerateSpec, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, persona index) of one block. Always the first draws of the block's generator."""
    first = block * BLOCK_USERS
    ids = np.arange(first, min(first + BLOCK_USERS, spec.users), dtype=np.int64) + spec.first_user_id
    personas = spec.persona_set.personas
    shares = np.array([p.share for p in personas])
    persona = rng.choice(len(personas), size=len(ids), p=shares / shares.sum())
    return ids, persona


def block_truth(spec: GenerateSpec, block: int) -> pd.DataFrame:
    """user_id -> persona of one block. In the invoices layout only the customers with an invoice
    line (users who bought something), keyed by their CustomerID (the same number)."""
    ids, persona = _block_personas(spec, block, _rng(spec, block))
    truth = pd.DataFrame({"user_id": ids, "persona": np.array(spec.persona_set.names, dtype=object)[persona]})
    if spec.layout == "invoices":
        events = _clickstream(spec, block)[0]
        truth = truth[truth.user_id.isin(events.user_id[events.event_type == "purchase"])].reset_index(drop=True)
    return truth


def _params(personas: tuple[Persona, ...], persona: np.ndarray):
    """A getter of one persona attribute per user: param("cart_rate") or param("first_active", 0)."""

    def param(attr: str, index: int | None = None) -> np.ndarray:
        values = [getattr(p, attr) if index is None else getattr(p, attr)[index] for p in personas]
        return np.array(values, dtype=float)[persona]

    return param


def _jitter(rng: np.random.Generator, values: np.ndarray, sigma: float) -> np.ndarray:
    """Per-user variation around the persona's value (log-normal, median preserved)."""
    return values * rng.lognormal(0.0, sigma, size=len(values))


def _category_weights(persona_set: PersonaSet) -> np.ndarray:
    categories = persona_set.categories
    weights = np.full((len(persona_set.personas), len(categories)), persona_set.blur.base_category_weight)
    for i, persona in enumerate(persona_set.personas):
        for name, weight in persona.categories.items():
            weights[i, categories.index(name)] = weight
    return weights


def _starts(counts: np.ndarray) -> np.ndarray:
    """Index of the first element of each group in a flat array of consecutive groups."""
    return np.cumsum(counts) - counts


def generate_block(spec: GenerateSpec, block: int) -> pd.DataFrame:
    """All records of one block of users (deterministic for (seed, block)): clickstream events in
    the rees46 layout, invoice lines in the invoices layout."""
    if spec.layout == "invoices":
        return invoice_block(spec, block)
    events, rng, _, _ = _clickstream(spec, block)
    return _add_noise(spec, rng, events)


def _clickstream(spec: GenerateSpec, block: int) -> tuple[pd.DataFrame, np.random.Generator, np.ndarray, np.ndarray]:
    """(events without noise, the block's generator after them, user ids, persona index per user)."""
    rng = _rng(spec, block)
    ids, persona = _block_personas(spec, block, rng)
    n_users, days = len(ids), float(spec.days)
    persona_set, blur = spec.persona_set, spec.persona_set.blur
    categories = persona_set.categories
    param = _params(persona_set.personas, persona)

    # Activity span: first and last visit (fractional days from the window start).
    first = rng.uniform(param("first_active", 0), param("first_active", 1)) * days
    last_gap = rng.uniform(param("last_gap", 0), param("last_gap", 1)) * days
    last = np.maximum(days - last_gap, first)
    one_timer = param("sessions_per_week") == 0
    last = np.where(one_timer, np.minimum(first + rng.uniform(0, 3, n_users), days), last)

    rate = _jitter(rng, param("sessions_per_week"), blur.rate)
    sessions = 1 + rng.poisson(rate * (last - first) / 7.0)
    sessions = np.where(one_timer, 1 + rng.poisson(0.5, n_users), sessions)

    # Per-user behaviour around the persona's.
    events_mean = _jitter(rng, param("events_per_session"), blur.events)
    gap_mean = _jitter(rng, param("seconds_between_events"), blur.gap)
    cart_rate = np.clip(_jitter(rng, param("cart_rate"), blur.funnel), 0, 0.9)
    remove_rate = np.clip(_jitter(rng, param("remove_rate"), blur.funnel), 0, 0.95 - cart_rate)
    buy_rate = np.clip(_jitter(rng, param("buy_session_rate"), blur.funnel), 0, 1)
    items = param("items_per_order")
    log_price = np.log(_jitter(rng, param("median_price"), blur.price))
    hour = param("hour") + rng.normal(0, blur.hour, n_users)
    hour_spread = param("hour_spread")
    cat_weights = _category_weights(persona_set)[persona] * rng.lognormal(0, blur.category, (n_users, len(categories)))
    cat_cdf = np.cumsum(cat_weights / cat_weights.sum(axis=1, keepdims=True), axis=1)

    # Sessions: user, index within the user's sessions, events, purchased items, start time.
    s_user = np.repeat(np.arange(n_users), sessions)
    s_index = np.arange(len(s_user)) - np.repeat(_starts(sessions), sessions)
    n_sessions = len(s_user)
    s_last = s_index == sessions[s_user] - 1
    # The last session falls on the last active day, so that recency follows the persona.
    s_day = np.where(s_last, last[s_user], first[s_user] + rng.random(n_sessions) * (last - first)[s_user])
    s_day = np.clip(np.floor(s_day), 0, days - 1)
    s_hour = np.mod(hour[s_user] + rng.normal(0, hour_spread[s_user]), 24.0)
    s_events = 1 + rng.poisson(np.maximum(events_mean[s_user] - 1, 0))
    s_buys = rng.random(n_sessions) < buy_rate[s_user]
    s_buys = np.where(one_timer[s_user], s_last, s_buys)  # a one-time buyer buys on the last visit
    s_items = np.where(s_buys, 1 + rng.poisson(items[s_user] - 1), 0)
    s_events = np.maximum(s_events, 2 * s_items + 1)  # a view, then each item carted, then bought

    # Events: position in the session, time.
    e_session = np.repeat(np.arange(n_sessions), s_events)
    e_first = np.repeat(_starts(s_events), s_events)
    e_pos = np.arange(len(e_session)) - e_first
    e_user = s_user[e_session]
    n_events = len(e_session)
    offsets = np.cumsum(rng.exponential(gap_mean[e_user]) * (e_pos > 0))
    offsets -= offsets[e_first]
    duration = offsets[_starts(s_events) + s_events - 1]
    # Sessions start at their hour but end before the window does.
    s_start = np.minimum(s_day * SECONDS_PER_DAY + s_hour * 3600, days * SECONDS_PER_DAY - 1 - duration)
    seconds = np.clip(np.floor(np.maximum(s_start, 0)[e_session] + offsets), 0, days * SECONDS_PER_DAY - 1)

    # Event types: browsing (view / cart / remove by the user's rates), then for a purchase the
    # items carted and bought, in that order.
    e_items = s_items[e_session]
    from_end = s_events[e_session] - e_pos  # 1 for the last event of the session
    is_purchase = from_end <= e_items
    is_checkout_cart = ~is_purchase & (from_end <= 2 * e_items)
    u = rng.random(n_events)
    kind = np.where(u < cart_rate[e_user], 1, np.where(u < cart_rate[e_user] + remove_rate[e_user], 2, 0))
    kind = np.where(is_purchase, 3, np.where(is_checkout_cart, 1, kind))

    # Products: category by the user's preferences, price point around the user's price level.
    category = np.minimum((rng.random(n_events)[:, None] > cat_cdf[e_user]).sum(axis=1), len(categories) - 1)
    step = np.rint((log_price[e_user] + rng.normal(0, 0.35, n_events)) * PRICE_STEPS_PER_E)
    step = np.clip(step, 0, PRICE_STEPS - 1).astype(np.int64)
    product = category * 1_000_000 + step * 1000 + rng.integers(0, PRODUCTS_PER_PRICE, n_events)
    # A purchased item is the product carted `items` events earlier.
    bought = np.flatnonzero(is_purchase)
    product[bought] = product[bought - e_items[bought]]

    events = pd.DataFrame(
        {
            "event_time": _format_times(spec, seconds),
            "event_type": np.array(EVENT_TYPES, dtype=object)[kind],
            "product_id": product,
            "category_code": np.array(categories, dtype=object)[product // 1_000_000],
            "brand": np.array(BRANDS, dtype=object)[_brand_index(product)],
            "price": product_price(product),
            "user_id": ids[e_user],
            "user_session": _session_ids(spec, ids[s_user], s_index)[e_session],
        }
    )
    return events, rng, ids, persona


# --- invoice lines (the Online Retail layout) ------------------------------------------------------


def invoice_block(spec: GenerateSpec, block: int) -> pd.DataFrame:
    """Invoice lines of one block: the clickstream's purchases (same users, sessions, products, prices
    and times), one invoice per session with a purchase, one line per product bought in it, and
    later cancellations of some lines. Views and carts leave no trace in this layout.

    Quantity: the times the product was bought in the session plus Poisson(items_per_order - 1).
    InvoiceDate: the session's last purchase, to the minute (the real file has no seconds).
    Country: one per customer, from the persona's mix. A cancellation ("C" + its own number) takes
    back a line of an earlier invoice (same StockCode, UnitPrice, customer; quantity negative, all of
    it or part), on one credit invoice per order, one to a few days later at about the order's hour;
    each line is cancelled with the customer's return rate (the persona's return_rate, log-normal
    spread), unless the cancellation would fall after the window.
    Invoice numbers are unique: block b numbers from INVOICE_FIRST_NUMBER + b * invoice_stride,
    orders in time order, then cancellations (six digits up to 45,000 users over 90 days).

    The draws beyond the clickstream come from a generator of their own, so the purchases are the
    rees46 layout's, draw for draw."""
    events, _, ids, persona = _clickstream(spec, block)
    rng = np.random.default_rng([spec.seed, block, 11])
    personas = spec.persona_set.personas
    param = _params(personas, persona)
    countries, country_cdf = _country_table(personas)
    user_country = np.minimum((rng.random(len(ids))[:, None] > country_cdf[persona]).sum(axis=1), len(countries) - 1)
    return_rate = np.clip(_jitter(rng, param("return_rate"), spec.persona_set.blur.funnel), 0, 0.9)
    extra_items = np.maximum(param("items_per_order") - 1, 0)

    bought = events[events.event_type == "purchase"]
    if bought.empty:  # nobody in the block bought anything
        return pd.DataFrame({f.name: pd.Series(dtype=_PANDAS_TYPES[type(f.dataType)]) for f in INVOICE_SCHEMA.fields})
    seconds = (bought.event_time.to_numpy().astype("datetime64[s]") - np.datetime64(spec.start_date, "s")).astype(np.int64)
    bought = bought.assign(seconds=seconds // 60 * 60)
    # Orders in time order (ties: customer, session); their lines by product.
    orders = bought.groupby(["user_id", "user_session"], sort=True).seconds.max().rename("placed").reset_index()
    orders = orders.sort_values(["placed", "user_id", "user_session"], kind="stable").reset_index(drop=True)
    base = INVOICE_FIRST_NUMBER + block * spec.invoice_stride
    orders["number"] = base + np.arange(len(orders), dtype=np.int64)
    lines = (bought.groupby(["user_id", "user_session", "product_id"], sort=True)
             .agg(times=("seconds", "size"), price=("price", "first"), category=("category_code", "first"))
             .reset_index().merge(orders, on=["user_id", "user_session"]))
    user = (lines.user_id.to_numpy() - ids[0]).astype(np.int64)  # index in the block
    quantity = lines.times.to_numpy(np.int64) + rng.poisson(extra_items[user])

    # Cancellations: some lines of an order, on one credit invoice per order, one to a few days later
    # at about the hour of the order; one that would fall after the window has not happened yet.
    position = lines.number.to_numpy() - base
    delay = SECONDS_PER_DAY * (1 + rng.poisson(1.5, len(orders))) + rng.uniform(-3600, 3600, len(orders))
    credit_time = ((orders.placed.to_numpy() + delay) // 60 * 60).astype(np.int64)
    in_window = credit_time <= spec.days * SECONDS_PER_DAY - 60
    cancelled = (rng.random(len(lines)) < return_rate[user]) & in_window[position]
    credited = np.unique(lines.number.to_numpy()[cancelled]) - base  # order positions, in time order
    credit_order = credited[np.lexsort((credited, credit_time[credited]))]
    credit_number = np.zeros(len(orders), dtype=np.int64)
    credit_number[credit_order] = base + len(orders) + np.arange(len(credit_order))
    if len(orders) + len(credit_order) > spec.invoice_stride:
        raise ValueError(f"block {block}: {len(orders) + len(credit_order)} invoices exceed the "
                         f"{spec.invoice_stride} numbers reserved per block")
    full = rng.random(len(lines)) < 0.7
    taken_back = np.where(full, quantity, rng.integers(1, quantity + 1))

    sale = {"number": lines.number.to_numpy(), "quantity": quantity, "seconds": lines.placed.to_numpy()}
    credit = {"number": credit_number[position][cancelled], "quantity": -taken_back[cancelled],
              "seconds": credit_time[position][cancelled]}
    parts = []
    for part, rows, prefix in ((sale, np.ones(len(lines), bool), ""), (credit, cancelled, "C")):
        if not rows.any():
            continue
        product = lines.product_id.to_numpy()[rows]
        parts.append(pd.DataFrame({
            "InvoiceNo": prefix + pd.Series(part["number"], dtype=np.int64).astype(str),
            "StockCode": pd.Series(product, dtype=np.int64).astype(str),
            "Description": _descriptions(lines.category.to_numpy()[rows], product),
            "Quantity": part["quantity"].astype(np.int64),
            "InvoiceDate": _format_times(spec, part["seconds"].astype(np.int64)),
            "UnitPrice": lines.price.to_numpy(float)[rows],
            "CustomerID": lines.user_id.to_numpy(float)[rows],
            "Country": np.array(countries, dtype=object)[user_country[user[rows]]],
            "_order": part["seconds"] * 2 + (prefix == "C"),
            "_number": part["number"],
            "_product": product,
        }))
    invoices = pd.concat(parts, ignore_index=True).sort_values(["_order", "_number", "_product"], kind="stable")
    invoices = invoices[INVOICE_COLUMNS].reset_index(drop=True)
    return _add_noise(spec, rng, invoices, price="UnitPrice")


def _country_table(personas: tuple[Persona, ...]) -> tuple[list[str], np.ndarray]:
    """(country names, cumulative country shares per persona)."""
    mixes = [p.countries or COUNTRY_MIX for p in personas]
    names = list(dict.fromkeys([*COUNTRY_MIX, *(name for mix in mixes for name in mix)]))
    weights = np.array([[mix.get(name, 0.0) for name in names] for mix in mixes])
    return names, np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)


def _descriptions(category: np.ndarray, product: np.ndarray) -> np.ndarray:
    """Readable product text from the category: home.decor.lamp, product 7120345 -> HOME DECOR LAMP 120345."""
    words = pd.Series(category, dtype=object).str.replace(".", " ", regex=False).str.upper()
    return (words + " " + pd.Series(product % 1_000_000, dtype=np.int64).astype(str).str.zfill(6)).to_numpy(dtype=object)


def product_price(product: np.ndarray) -> np.ndarray:
    """The price of a product (from its price step)."""
    return np.round(np.exp(((product // 1000) % 1000) / PRICE_STEPS_PER_E), 2)


def _brand_index(product: np.ndarray) -> np.ndarray:
    return (product * 2654435761 // 7) % len(BRANDS)


def _format_times(spec: GenerateSpec, seconds: np.ndarray) -> np.ndarray:
    start = np.datetime64(spec.start_date, "s")
    text = np.datetime_as_string(start + seconds.astype("timedelta64[s]"), unit="s")
    return np.char.replace(text, "T", " ").astype(object)


def _session_ids(spec: GenerateSpec, users: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Session ids like REES46's (uuid-shaped), unique per user session, stable for the seed."""
    key = (users.astype(np.uint64) * np.uint64(1_000_003) + index.astype(np.uint64)) ^ np.uint64(spec.seed & 0xFFFFFFFF)
    high = _mix(key)
    low = _mix(high ^ key)
    text = [f"{h:016x}{lo:016x}" for h, lo in zip(high.tolist(), low.tolist(), strict=True)]
    return np.array([f"{t[:8]}-{t[8:12]}-{t[12:16]}-{t[16:20]}-{t[20:]}" for t in text], dtype=object)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on 64-bit integers (distinct keys, distinct ids)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _add_noise(spec: GenerateSpec, rng: np.random.Generator, events: pd.DataFrame, price: str = "price") -> pd.DataFrame:
    if spec.missing_price_share > 0:
        missing = rng.random(len(events)) < spec.missing_price_share
        events[price] = events[price].mask(missing)
    if spec.duplicate_share > 0:
        # An exact copy right after the original, as a client that resends an event would.
        copies = np.where(rng.random(len(events)) < spec.duplicate_share, 2, 1)
        events = events.loc[events.index.repeat(copies)].reset_index(drop=True)
    return events


# --- text lines (json / csv) with malformed lines mixed in ---------------------------------------


def _to_lines(events: pd.DataFrame, fmt: str) -> np.ndarray:
    """Records as json or csv lines (no field holds a comma or a quote); a null price is an empty field."""
    if fmt == "json":
        text = events.to_json(orient="records", lines=True)
        return np.array(text.splitlines(), dtype=object)
    fields = []
    for column in events.columns:
        values = events[column]
        if values.dtype.kind == "f":
            array = values.to_numpy()
            fields.append(np.where(np.isnan(array), "", array.astype(str)).astype(object))
        else:
            fields.append(values.astype(str).to_numpy(dtype=object))
    line = fields[0]
    for values in fields[1:]:
        line = line + "," + values
    return line


def _malformed(rng: np.random.Generator, lines: np.ndarray, count: int, fmt: str) -> list[str]:
    """Lines that are no valid record: truncated records, wrong field counts, garbage."""
    bad = []
    for source, variant in zip(rng.integers(0, len(lines), count).tolist(), rng.random(count).tolist(), strict=True):
        line = lines[source]
        if variant < 0.7:  # cut off mid-record (an interrupted write)
            bad.append(line[: max(5, int(len(line) * (0.1 + 0.5 * variant)))] if fmt == "json" else
                       ",".join(line.split(",")[: 2 + int(variant * 5)]))
        elif variant < 0.85:  # a broken record: trailing comma (json), a field too many (csv)
            bad.append(line[:-1] + ",}" if fmt == "json" else line + ",extra")
        else:  # not a record at all
            bad.append("<html><body>502 Bad Gateway</body></html>" if fmt == "json" else "#### binary garbage ####")
    return bad


def block_lines(spec: GenerateSpec, block: int, fmt: str) -> list[str] | np.ndarray:
    """One block's records as json or csv lines, with its malformed lines mixed in."""
    lines = _to_lines(generate_block(spec, block), fmt)
    if spec.malformed_share <= 0 or len(lines) == 0:
        return lines
    rng = np.random.default_rng([spec.seed, block, 7])
    count = int(rng.binomial(len(lines), spec.malformed_share))
    if count == 0:
        return lines
    bad = np.array(_malformed(rng, lines, count, fmt), dtype=object)
    positions = np.sort(rng.integers(0, len(lines) + 1, count))
    return np.insert(lines, positions, bad)


# --- Spark -----------------------------------------------------------------------------------------


def _blocks(spark: SparkSession, spec: GenerateSpec) -> DataFrame:
    return spark.range(0, spec.blocks, 1, spec.num_partitions()).withColumnRenamed("id", "block")


def partition_blocks(spec: GenerateSpec) -> list[range]:
    """The blocks of each partition (file) that `_blocks` gives: spark.range's contiguous slices."""
    blocks, partitions = spec.blocks, spec.num_partitions()
    return [range(i * blocks // partitions, (i + 1) * blocks // partitions) for i in range(partitions)]


def generate_events(spark: SparkSession, spec: GenerateSpec) -> tuple[DataFrame, DataFrame]:
    """(events, truth) as DataFrames, evaluated lazily on the executors (one block at a time)."""

    def events(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for block in batch["block"].tolist():
                yield generate_block(spec, int(block))

    def truth(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for batch in batches:
            for block in batch["block"].tolist():
                yield block_truth(spec, int(block))

    blocks = _blocks(spark, spec)
    return blocks.mapInPandas(events, spec.schema), blocks.mapInPandas(truth, TRUTH_SCHEMA)


def _text_lines(spark: SparkSession, spec: GenerateSpec, fmt: str) -> DataFrame:
    """Records as json/csv text lines with malformed lines mixed in; every csv file starts with a header."""
    header = csv_header(spec)

    def lines(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        if fmt == "csv":
            yield pd.DataFrame({"value": [header]})  # first line of this partition's file
        for batch in batches:
            for block in batch["block"].tolist():
                yield pd.DataFrame({"value": block_lines(spec, int(block), fmt)})

    return _blocks(spark, spec).mapInPandas(lines, LINE_SCHEMA)


def csv_header(spec: GenerateSpec) -> str:
    return ",".join(spec.schema.fieldNames())


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
    """UsageError when out_dir/events or out_dir/truth exists and `overwrite` is not given: a
    generated sample never silently replaces data that is there (yours, or a sample you keep)."""
    if overwrite:
        return
    root = out_dir.rstrip("/")
    there = [f"{root}/{name}" for name in ("events", "truth") if path_exists(f"{root}/{name}")]
    if there:
        raise UsageError(
            f"--out {out_dir!r}: {' and '.join(there)} already exist{'s' if len(there) == 1 else ''}; "
            "generating would replace them. Choose another --out, or add --overwrite to replace them"
        )


def write_dataset(
    spark: SparkSession, spec: GenerateSpec, out_dir: str, fmt: str = "parquet", *, overwrite: bool = False
) -> dict:
    """Write out_dir/events/ (parquet, json or csv) and out_dir/truth/ (parquet: user_id, persona);
    existing ones only with `overwrite` (check_out_dir).

    Returns a summary: users, days, seed, format, users per persona (from the small truth table) and,
    for parquet, the number of events (read from the Parquet footers, no scan)."""
    check_request(spec, out_dir, fmt, overwrite)
    root = out_dir.rstrip("/")
    events, truth = generate_events(spark, spec)
    log_start(spec, root, fmt)
    if fmt == "parquet":
        events.write.mode("overwrite").parquet(f"{root}/events")
    else:
        _text_lines(spark, spec, fmt).write.mode("overwrite").text(f"{root}/events")
    truth.write.mode("overwrite").parquet(f"{root}/truth")
    personas = spark.read.parquet(f"{root}/truth").groupBy("persona").count().collect()
    events_written = spark.read.parquet(f"{root}/events").count() if fmt == "parquet" else None  # from the footers
    return summarise(spec, fmt, {row["persona"]: int(row["count"]) for row in personas}, events_written)


def check_request(spec: GenerateSpec, out_dir: str, fmt: str, overwrite: bool) -> None:
    """What any writer of a sample checks first: the folders (check_out_dir) and the format."""
    check_out_dir(out_dir, overwrite)
    if fmt not in ("parquet", "json", "csv"):
        raise ValueError(f"format {fmt!r} is not one of parquet, json, csv")
    if spec.malformed_share > 0 and fmt == "parquet":
        raise ValueError(
            f"malformed_share={spec.malformed_share} needs a text format: malformed lines cannot be written "
            "as Parquet; use --format json or csv, or set the share to 0"
        )


def log_start(spec: GenerateSpec, root: str, fmt: str) -> None:
    log.info("generating %s users over %d days (seed %d) into %s/events as %s", f"{spec.users:,}", spec.days,
             spec.seed, root, fmt)


def summarise(spec: GenerateSpec, fmt: str, personas: dict[str, int], events: int | None) -> dict:
    """A written sample's summary: users, days, seed, format, users per persona and, for parquet, the
    number of events."""
    summary: dict = {
        "users": spec.users,
        "days": spec.days,
        "persona_set": spec.personas,
        "layout": spec.layout,
        "seed": spec.seed,
        "format": fmt,
        "personas": dict(sorted(personas.items())),
    }
    if events is not None:
        summary["events"] = events
    log.info("generated %s", summary)
    return summary
