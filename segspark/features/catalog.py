"""The feature catalog: what every column of `user_features` means.

Consumers of the table (BI, CRM audiences, data scientists) read this through
`segspark features --list` and the README; a feature column without an entry here fails a test.

Most features are single columns. Three are families of slot columns whose number comes from the
config (`features.top_categories`, `features.one_hot.<column>.top_n`): slot i is the i-th most
common value in the run's data, or the i-th value pinned in the config. Slots keep the table's
schema the same from run to run; the value behind each slot is recorded in the run's metrics
(`runs.metrics.feature_slots`) and logged.
"""

from __future__ import annotations

from dataclasses import dataclass

from segspark.config import FeaturesConfig


@dataclass(frozen=True)
class Feature:
    name: str
    definition: str
    unit: str
    source: str  # the function that computes it


_B = "segspark.features.behaviour.user_features"
_NULL_RATE = "; null when the denominator is 0"

CATALOG: tuple[Feature, ...] = (
    # --- canonical (DESIGN.md): their meaning is a contract -------------------------------------
    Feature("recency_days", "days from the last purchase to the end of the as-of day; null if the user never purchased",
            "days", _B),
    Feature("frequency", "orders: distinct orders (order id; without one, sessions with a purchase)", "orders", _B),
    Feature("monetary", "net revenue: purchases minus returns, price x quantity, rounded to cents", "currency", _B),
    Feature("tenure_days", "days from the first event to the end of the as-of day", "days", _B),
    Feature("sessions", "distinct sessions: the source's session id, or a new one after the inactivity gap",
            "sessions", _B),
    # --- activity --------------------------------------------------------------------------------
    Feature("events", "events of every type", "events", _B),
    Feature("views", "view events", "events", _B),
    Feature("carts", "add-to-cart events", "events", _B),
    Feature("removes_from_cart", "remove-from-cart events", "events", _B),
    Feature("purchases", "purchase events (order lines)", "events", _B),
    Feature("returns", "return events: order lines with a negative quantity (cancellations, credit notes)",
            "events", _B),
    Feature("session_duration_mean_min", "mean session duration, first to last event of the session",
            "minutes", _B),
    Feature("session_duration_median_min",
            "median session duration (approximate: percentile_approx, rank error 1/features.median_accuracy)",
            "minutes", _B),
    Feature("events_per_session", "events / sessions", "events", _B),
    Feature("active_days", "distinct calendar days with an event (features.time_zone)", "days", _B),
    Feature("sessions_per_week", "sessions / weeks of tenure (at least one week, so a new user is not inflated)",
            "sessions/week", _B),
    # --- purchases ---------------------------------------------------------------------------------
    Feature("purchase_interval_mean_days", "mean time between consecutive orders; null with fewer than 2 orders",
            "days", _B),
    Feature("purchase_interval_std_days",
            "population standard deviation of the time between consecutive orders; null with fewer than 2 orders",
            "days", _B),
    Feature("basket_size", "items bought (sum of quantities) per order; null without orders", "items", _B),
    Feature("avg_order_value", "gross purchase revenue per order (returns not netted); null without orders",
            "currency", _B),
    Feature("return_value", "value of returned lines, price x |quantity|", "currency", _B),
    Feature("return_share", "return_value / gross purchase revenue" + _NULL_RATE + " (can exceed 1)", "ratio", _B),
    # --- funnel -------------------------------------------------------------------------------------
    Feature("view_to_cart_rate", "carts / views" + _NULL_RATE + " (can exceed 1: carts without a view)", "ratio", _B),
    Feature("cart_to_purchase_rate", "purchases / carts" + _NULL_RATE + " (can exceed 1: purchases without a cart)",
            "ratio", _B),
    Feature("remove_share", "removes_from_cart / carts" + _NULL_RATE, "ratio", _B),
    # --- price level --------------------------------------------------------------------------------
    Feature("price_viewed_mean", "mean price of viewed items; null without priced views", "currency", _B),
    Feature("price_viewed_median", "median price of viewed items (approximate, as session_duration_median_min)",
            "currency", _B),
    Feature("price_bought_mean", "mean unit price of purchase lines; null without purchases", "currency", _B),
    Feature("price_bought_median", "median unit price of purchase lines (approximate)", "currency", _B),
    # --- time of day / week (local time in features.time_zone) ------------------------------------------
    Feature("night_share", "share of events between 00:00 and 06:00", "share", _B),
    Feature("morning_share", "share of events between 06:00 and 12:00", "share", _B),
    Feature("afternoon_share", "share of events between 12:00 and 18:00", "share", _B),
    Feature("evening_share", "share of events between 18:00 and 24:00", "share", _B),
    Feature("weekend_share", "share of events on Saturday or Sunday", "share", _B),
    # --- breadth -------------------------------------------------------------------------------------
    Feature("distinct_items", "distinct items (item id) with any event", "items", _B),
    Feature("distinct_categories", "distinct categories (at features.category_level) with any event",
            "categories", _B),
    # --- trend ---------------------------------------------------------------------------------------
    Feature("events_last_window", "events in the last features.trend_window_days days before the cutoff", "events", _B),
    Feature("events_prior_window", "events in the features.trend_window_days days before that", "events", _B),
    Feature("activity_trend",
            "(last - prior) / (last + prior) of the two windows' events: 1 new, 0 steady, -1 gone quiet; "
            "0 when both are empty", "ratio", _B),
)

# Slot families: (name template, definition template, unit). {i} is the slot number from 1.
CATEGORY_SLOT = ("top_category_{i}_share", "share of events in the run's category slot {i}", "share")
CATEGORY_OTHER = Feature("other_category_share", "share of events in any other category or none", "share", _B)
ONE_HOT_SLOT = ("{column}_top_{i}", "1 if the user's most frequent {column} is the run's {column} slot {i}, else 0",
                "indicator")
ONE_HOT_OTHER = ("{column}_other", "1 if the user's most frequent {column} is in no slot (or unknown), else 0",
                 "indicator")
ONE_HOT_COLUMNS = ("country", "device")


def category_slot_names(cfg: FeaturesConfig) -> list[str]:
    return [CATEGORY_SLOT[0].format(i=i) for i in range(1, _category_slots(cfg) + 1)]


def one_hot_names(cfg: FeaturesConfig, column: str) -> list[str]:
    slots = _one_hot_slots(cfg, column)
    return [ONE_HOT_SLOT[0].format(column=column, i=i) for i in range(1, slots + 1)] + [
        ONE_HOT_OTHER[0].format(column=column)
    ]


def _category_slots(cfg: FeaturesConfig) -> int:
    return len(cfg.categories) if cfg.categories else cfg.top_categories


def _one_hot_slots(cfg: FeaturesConfig, column: str) -> int:
    spec = cfg.one_hot.get(column)
    if spec is None:
        return 0
    return len(spec.values) if spec.values else spec.top_n


def catalog(cfg: FeaturesConfig | None = None) -> tuple[Feature, ...]:
    """Every feature column for this config, in table order."""
    cfg = cfg or FeaturesConfig()
    features = list(CATALOG)
    for i in range(1, _category_slots(cfg) + 1):
        features.append(Feature(CATEGORY_SLOT[0].format(i=i), CATEGORY_SLOT[1].format(i=i), CATEGORY_SLOT[2], _B))
    features.append(CATEGORY_OTHER)
    for column in ONE_HOT_COLUMNS:
        if column not in cfg.one_hot:
            continue
        for i in range(1, _one_hot_slots(cfg, column) + 1):
            name, definition, unit = (t.format(column=column, i=i) for t in ONE_HOT_SLOT)
            features.append(Feature(name, definition, unit, _B))
        name, definition, unit = (t.format(column=column) for t in ONE_HOT_OTHER)
        features.append(Feature(name, definition, unit, _B))
    return tuple(features)


def feature_columns(cfg: FeaturesConfig | None = None) -> tuple[str, ...]:
    return tuple(feature.name for feature in catalog(cfg))


def by_name(cfg: FeaturesConfig | None = None) -> dict[str, Feature]:
    return {feature.name: feature for feature in catalog(cfg)}


def render_table(cfg: FeaturesConfig | None = None) -> str:
    """The catalog as aligned plain text (for `segspark features --list`)."""
    features = catalog(cfg)
    width = max(len(f.name) for f in features)
    unit_width = max(len(f.unit) for f in features)
    lines = [f"{'feature':<{width}}  {'unit':<{unit_width}}  definition"]
    lines += [f"{f.name:<{width}}  {f.unit:<{unit_width}}  {f.definition}" for f in features]
    return "\n".join(lines)


def render_markdown(cfg: FeaturesConfig | None = None) -> str:
    """The catalog as a Markdown document (docs/features.md is this, kept in step by a test)."""
    lines = [
        "# Feature catalog",
        "",
        "Generated from `segspark/features/catalog.py` (`segspark features --list --markdown`); do not edit.",
        "Columns of the `user_features` table for the default config; the slot families",
        "(`top_category_<i>_share`, `<column>_top_<i>`) are as wide as `features.top_categories` and",
        "`features.one_hot.<column>.top_n` make them, and the value behind each slot is in",
        "`runs.metrics.feature_slots`.",
        "",
        "| feature | unit | definition |",
        "|---|---|---|",
    ]
    lines += [f"| `{f.name}` | {f.unit} | {f.definition} |" for f in catalog(cfg)]
    return "\n".join(lines) + "\n"
