"""The bounded user sample every model fits on: chosen by a hash of user_id, collected once in Arrow.

Choosing k is a search over many small fits (models.selection); the autoencoder and HDBSCAN are
fitted on samples too. All of them read one sample of the prepared users: the `size` users with the
smallest xxhash64(user_id, seed) (ties by user_id), or every user when there are fewer. A hash order
rather than `DataFrame.sample`: the same users come back on every run and on any partitioning, a
user keeps being sampled when others are added, and the first m rows of the sample are themselves
the hash sample of size m (the silhouette's rows, the HDBSCAN sample).

Selecting the rows is one Spark job: a filter on the hash (a threshold that keeps about 1.2 x
`size` users, computed from the user count the run already knows) and a top-`size` by hash of what
passes; the prepared features come back as Arrow columns, one double column per feature. Only the
bounded sample reaches the driver.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

log = logging.getLogger(__name__)

_HASH = "_sample_hash"
_LONG_SPAN = 2**64


@dataclass(frozen=True)
class UserSample:
    """Prepared vectors of the sampled users, in hash order."""

    user_ids: np.ndarray  # (n,) object: user_id strings
    matrix: np.ndarray  # (n, d) float64: the prepared vectors
    total_users: int  # users the sample was drawn from
    seed: int

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    def head(self, rows: int) -> UserSample:
        """The first `rows` users: the hash sample of that size."""
        return UserSample(self.user_ids[:rows], self.matrix[:rows], self.total_users, self.seed)

    def describe(self) -> str:
        return f"{self.size:,} of {self.total_users:,} users"


def hash_order(seed: int):
    return F.xxhash64(F.col("user_id").cast("string"), F.lit(int(seed)))


def collect_user_sample(
    prepared: DataFrame, columns: list[str], size: int, total_users: int, seed: int
) -> UserSample:
    """The hash sample of at most `size` users of `prepared` (models.prepare: user_id and the prepared
    feature columns, `columns` in the vector's order). total_users: how many rows `prepared` has (the
    run knows it; it sets the filter)."""
    if size < 1:
        raise ValueError(f"sample size must be at least 1, got {size}")
    wanted = min(size, total_users)
    share = 1.0
    if total_users > size:
        # Keep hashes below a threshold that lets through ~1.2 x size users (+ 6 standard deviations),
        # so that the top-size sort reads a fraction of the users; the hash is uniform over longs.
        share = min(1.0, (1.2 * size + 6.0 * math.sqrt(size) + 50.0) / total_users)
    rows = _top_by_hash(prepared, columns, wanted, seed, share)
    if len(rows) < wanted:  # the filter let through fewer than `size` users (odds about 1e-9)
        log.warning("user sample: the hash filter kept %d of the %d users wanted; sorting every user", len(rows), wanted)
        rows = _top_by_hash(prepared, columns, wanted, seed, 1.0)
    matrix = rows[[f"x{i}" for i in range(len(columns))]].to_numpy(dtype=np.float64)
    sample = UserSample(rows["user_id"].to_numpy(dtype=object), np.ascontiguousarray(matrix), int(total_users), seed)
    log.info("user sample: %s (hash of user_id, seed %d), %d features", sample.describe(), seed, len(columns))
    return sample


def _top_by_hash(prepared: DataFrame, columns: list[str], rows: int, seed: int, share: float):
    values = [F.col(c).cast("double").alias(f"x{i}") for i, c in enumerate(columns)]
    hashed = prepared.select(F.col("user_id").cast("string").alias("user_id"), *values).withColumn(_HASH, hash_order(seed))
    if share < 1.0:
        hashed = hashed.where(F.col(_HASH) < F.lit(int(-(2**63) + share * _LONG_SPAN)))
    return hashed.orderBy(_HASH, "user_id").limit(rows).drop(_HASH).toPandas()
