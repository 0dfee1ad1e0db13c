"""Per-user features, computed point-in-time as of a date."""

from segspark.features.behaviour import as_of_cutoff, user_features

__all__ = ["as_of_cutoff", "user_features"]
