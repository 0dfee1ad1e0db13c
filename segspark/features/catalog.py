"""The feature catalog: what every column of `user_features` means.

Consumers of the table (BI, CRM audiences, data scientists) read this through
`segspark features --list` and the README; a feature column without an entry here fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feature:
    name: str
    definition: str
    unit: str
    source: str  # the function that computes it


_BEHAVIOUR = "segspark.features.behaviour.user_features"

CATALOG: tuple[Feature, ...] = (
    Feature(
        "recency_days",
        "days from the last purchase to the end of the as-of day; null if the user never purchased",
        "days",
        _BEHAVIOUR,
    ),
    Feature(
        "frequency", "distinct orders (order id; without one, sessions with a purchase)", "orders", _BEHAVIOUR
    ),
    Feature(
        "monetary",
        "net revenue: purchases minus returns, price x quantity, rounded to cents",
        "currency",
        _BEHAVIOUR,
    ),
    Feature("tenure_days", "days from the first event to the end of the as-of day", "days", _BEHAVIOUR),
    Feature(
        "sessions",
        "distinct sessions: the source's session id, or a new one after the inactivity gap",
        "sessions",
        _BEHAVIOUR,
    ),
    Feature("views", "view events", "events", _BEHAVIOUR),
    Feature("carts", "add-to-cart events", "events", _BEHAVIOUR),
    Feature("removes_from_cart", "remove-from-cart events", "events", _BEHAVIOUR),
    Feature("purchases", "purchase events (order lines)", "events", _BEHAVIOUR),
    Feature("returns", "return events (order lines with a negative quantity)", "events", _BEHAVIOUR),
)


def by_name() -> dict[str, Feature]:
    return {feature.name: feature for feature in CATALOG}


def render_table() -> str:
    """The catalog as aligned plain text (for `segspark features --list`)."""
    width = max(len(f.name) for f in CATALOG)
    unit_width = max(len(f.unit) for f in CATALOG)
    lines = [f"{'feature':<{width}}  {'unit':<{unit_width}}  definition"]
    lines += [f"{f.name:<{width}}  {f.unit:<{unit_width}}  {f.definition}" for f in CATALOG]
    return "\n".join(lines)
