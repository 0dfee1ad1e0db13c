"""Per-user features, computed point-in-time as of a date."""

from segspark.features.behaviour import FeatureSlots, as_of_cutoff, resolve_slots, user_features

__all__ = ["FeatureSlots", "as_of_cutoff", "resolve_slots", "user_features"]
