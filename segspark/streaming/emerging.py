"""Emerging segments in the stream: users the live models fit badly, clustered into candidate segments.

A new kind of customer shows up in the stream as users no trained segment fits: noise of a density
model (`ae_hdbscan` segment -1) or anomalies of the others (`is_anomaly`: e.g. a k-means distance
beyond the training run's anomaly threshold). Every batch, per `streaming.drift.emerging`:

1. the batch's outliers (users any of `outlier_models` calls noise, or scores above the
   `anomaly_quantile` of the training users' anomaly scores, or is_anomaly when that is null) are appended to
   `stream_outliers` with their autoencoder embedding (the one ae_hdbscan scoring computed anyway;
   the prepared feature vector when the bundle has no deep model) and their features;
2. the window is this batch and the `window_batches - 1` before it: its outlier rows over its scored
   users (`stream_batches.users` of the earlier batches, this batch's users counted here). When that
   share passes `outlier_share`, the window's outliers (the latest row per user, at most `max_users`
   of them, hash-selected) come to the driver and HDBSCAN (the `hdbscan` library, in models.hdbscan's
   settings style) clusters their embeddings together with up to as many training users' (the deep
   model's HDBSCAN sample, which stands for the known segments; `find_candidates` says why);
3. every cluster that is mostly outliers (`min_outlier_share`) with at least `min_cluster_size` of
   them is a candidate segment in `candidate_segments`: its users and size, the means of its
   members' features and their z-scores against the training users, and a name made by the rules
   that name trained segments (`segments.profiles.segment_names`). The batch's drift rows of the
   outlier models and its `stream_batches` row recommend a retrain, naming each candidate.

The live models are not touched: a candidate becomes a segment only when a retrain finds it, and
until then its users keep the segment (or -1) the bundle gives them.

Why the window is a Delta table: the window spans batches, and a restarted stream (a crash, a
redeploy) must see the outliers of the batches before it, which only a table gives without
re-scoring history; the rows are few (outliers only), written by the executors once per batch under
the stream's txn (a replayed batch adds nothing), and they let an analyst look at the users behind a
candidate. Recomputing the window from the other tables would need every window user's embedding
again, i.e. scoring them again.

Why the stream also keeps it in memory (`OutlierWindow`): reading the window back from the tables
every batch took three Spark jobs, 0.8 s of a 100k-event batch, and their cost grew with the
stream's age (each batch adds a file to both tables, and every read lists and opens them all). The
tables are read once, when the stream starts (beside the models' loading, where the checkpoint
says which batch comes first); after that each batch adds its own counts and its
`max_users` outliers of lowest hash, one query of the rows it has just written, whose cost does not
grow. Only bounded samples reach the driver.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from pyspark.ml.functions import vector_to_array
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from segspark.config import Config, EmergingConfig
from segspark.io.catalog import STREAM_OUTLIERS, TABLES, CandidateSegmentRow
from segspark.io.tables import output_table_exists, read_output_table, write_rows
from segspark.models import registry
from segspark.models.contract import NOISE_SEGMENT
from segspark.models.prepare import PREPARED_VECTOR
from segspark.runtime.session import share_session
from segspark.segments.profiles import SegmentProfile, ranked, segment_names

log = logging.getLogger(__name__)

OUTLIERS, CANDIDATES, BATCHES = "stream_outliers", "candidate_segments", "stream_batches"
EMBEDDINGS_SPACE, PREPARED_SPACE = "autoencoder embeddings", "prepared features"
TOP_FEATURES = 5  # as segment_profiles
VALUES = "_feature_values"  # `outlier_rows`' features as an array, for the window (not a table column)
BY_NAME = "_features_by_name"  # a stored row's features map where its keys are not the window's names in order


@dataclass(frozen=True)
class Population:
    """The training users' mean and population std of each feature: candidates' z-scores use them, so
    that a candidate reads against the segments the models know."""

    means: dict[str, float | None]
    stds: dict[str, float | None]


def population(training: DataFrame, names: Sequence[str]) -> Population:
    """One aggregation over the training run's user_features (positional aliases: names are free-form)."""
    alias = {n: f"_f{i}" for i, n in enumerate(names)}
    row = training.agg(
        *[F.avg(F.col(n).cast("double")).alias(f"m{alias[n]}") for n in names],
        *[F.stddev_pop(F.col(n).cast("double")).alias(f"s{alias[n]}") for n in names],
    ).collect()[0]
    return Population({n: _finite(row[f"m{alias[n]}"]) for n in names}, {n: _finite(row[f"s{alias[n]}"]) for n in names})


@dataclass(frozen=True)
class Candidate:
    candidate: int  # HDBSCAN's cluster number in this batch's fit
    name: str
    size: int
    means: dict[str, float | None]
    zscores: dict[str, float | None]
    top_features: list[str]
    training_members: int = 0  # reference training users in the cluster
    user_ids: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return f"emerging segment candidate '{self.name}' ({self.size} users)"


@dataclass
class Finding:
    """What the emerging-segment check saw in a batch's window."""

    models: list[str]  # the outlier models present in the bundle
    window_users: int
    window_outliers: int
    space: str
    clustered: int = 0  # outliers fitted (0: the share stayed under the threshold)
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.window_outliers / self.window_users if self.window_users else 0.0

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.candidates]


def training_thresholds(segments: DataFrame, models: Sequence[str], quantile: float | None) -> dict[str, float | None]:
    """Per model: the `quantile` of the training users' anomaly scores (`user_segments` of the training
    run), one aggregation; None for every model when quantile is None (their own is_anomaly)."""
    if quantile is None or not models:
        return dict.fromkeys(models)
    found = {
        row.model: row.threshold
        # NaN scores (HDBSCAN's GLOSH in a cluster of identical points) would sort above every number.
        for row in segments.where(F.col("model").isin(list(models)) & ~F.isnan("anomaly_score"))
        .groupBy("model").agg(F.percentile_approx("anomaly_score", quantile, 1000).alias("threshold")).collect()
    }
    return {m: (float(found[m]) if found.get(m) is not None else None) for m in models}


def outlier_flags(assignments: Mapping[str, DataFrame], thresholds: Mapping[str, float | None]) -> DataFrame | None:
    """user_id, models (sorted names) of the users that any model of `thresholds` calls noise (a noise
    model's -1) or an anomaly: its score above the model's threshold here, or is_anomaly where that
    is None. None when none of them is scored."""
    parts = []
    for name, threshold in thresholds.items():
        frame = assignments.get(name)
        if frame is None:
            continue
        bad = F.col("is_anomaly") if threshold is None else F.col("anomaly_score") > F.lit(float(threshold))
        if registry.get(name).noise:
            bad = bad | (F.col("segment") == F.lit(NOISE_SEGMENT))
        parts.append(frame.where(F.coalesce(bad, F.lit(False))).select(F.col("user_id").cast("string"), F.lit(name).alias("model")))
    if not parts:
        return None
    union = parts[0]
    for part in parts[1:]:
        union = union.unionByName(part)
    return union.groupBy("user_id").agg(F.array_sort(F.collect_set("model")).alias("models"))


def outlier_rows(flags: DataFrame, vectors: DataFrame, features: DataFrame, feature_names: Sequence[str], app_id: str,
                 batch_id: int, as_of: dt.date | None) -> DataFrame:
    """The `stream_outliers` rows of a batch: each flagged user with its vector (user_id, embedding)
    and its features as a map (the table's schema stays the same when the feature set changes), plus
    `VALUES`, the same features as an array in `feature_names` order, which `OutlierWindow.add` reads
    (the table's columns are `table_columns(rows)`)."""
    names = list(feature_names)
    doubles = F.array(*[F.col(n).cast("double") for n in names]) if names else F.array().cast("array<double>")
    values = features.select(
        F.col("user_id").cast("string").alias("user_id"),
        F.map_from_arrays(F.array(*[F.lit(n) for n in names]), doubles).alias("features"),
        doubles.alias(VALUES),
    )
    rows = flags.join(vectors, "user_id").join(values, "user_id").select(
        F.lit(app_id).alias("app_id"), F.lit(batch_id).cast("long").alias("batch_id"),
        F.lit(as_of).cast("date").alias("as_of"), "user_id", "models", "embedding", "features",
        F.current_timestamp().alias("processed_at"), VALUES,
    )
    return rows.select(*[F.col(f.name).cast(f.dataType) for f in STREAM_OUTLIERS.fields], VALUES)


def table_columns(rows: DataFrame) -> DataFrame:
    """`outlier_rows` as the `stream_outliers` table holds them (without `VALUES`)."""
    return rows.select(*[f.name for f in STREAM_OUTLIERS.fields])


def vectors_of(embeddings: DataFrame | None, prepared: DataFrame) -> tuple[DataFrame, str]:
    """(user_id, embedding as array<double>) and the space's name: the autoencoder's embeddings, which
    the deep model clusters in, else the prepared features (a bundle without the deep model)."""
    if embeddings is not None:
        return embeddings.select(F.col("user_id").cast("string"), F.col("embedding").cast("array<double>")), EMBEDDINGS_SPACE
    return prepared.select(F.col("user_id").cast("string"), vector_to_array(PREPARED_VECTOR).alias("embedding")), PREPARED_SPACE


@dataclass(frozen=True)
class WindowOutlier:
    """One outlier row of a batch as the window keeps it on the driver: `rank` is xxhash64(user_id),
    the sample's order; the features are an array in the window's `names` order (NaN: missing), a
    fraction of the memory of a dict per row."""

    user_id: str
    batch_id: int
    rank: int
    embedding: np.ndarray
    values: np.ndarray
    names: tuple[str, ...]

    @property
    def features(self) -> dict[str, float | None]:
        return {n: (None if math.isnan(v) else float(v)) for n, v in zip(self.names, self.values, strict=True)}


@dataclass(frozen=True)
class _WindowBatch:
    users: int  # users the batch scored
    outliers: int  # its outlier rows
    lowest: list[WindowOutlier]  # its max_users outliers of lowest (rank, user_id)


class OutlierWindow:
    """The emerging check's window, kept on the driver for the life of a stream (module docstring):
    per batch, the users it scored, its outliers, and its `max_users` outliers of lowest hash with
    their vectors and features, so at most window_batches x max_users rows.

    That is all the sample needs. The sample is the max_users window users of lowest hash, each with
    its latest row. A user among them is among the max_users lowest of every batch it is an outlier
    in (a batch holds no more users below it than the whole window does), so the batches' lowest
    hold every sampled user and each one's latest row: the same users and rows as a query of the
    whole window."""

    def __init__(self, names: Sequence[str], settings: EmergingConfig):
        self.names = tuple(names)
        self.size, self.max_users = settings.window_batches, settings.max_users
        self.batches: dict[int, _WindowBatch] = {}
        self.loaded = False
        self._preloaded: tuple[int, Future[dict[int, _WindowBatch]]] | None = None  # (last batch, its read)

    def first(self, batch_id: int) -> int:
        return batch_id - self.size + 1

    def preload(self, spark: SparkSession, cfg: Config, last_batch: int) -> None:
        """Start reading the window back from the tables while the stream starts, in a thread of its
        own, for a restart whose checkpoint planned up to `last_batch`: its first batch is that one
        again (a replay) or the next, so the window's batches up to `last_batch` hold what either
        needs. Read in that batch instead, it took 0.27-0.46 s of a restarted stream's first 10k-event
        batch (4.8-6.5 s) on this project's machines; beside the models' loading, little of the start."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segspark-window-load",
                                  initializer=share_session, initargs=(spark,))
        self._preloaded = (last_batch, pool.submit(self._read, spark, cfg, self.first(last_batch), last_batch))
        pool.shutdown(wait=False)  # the thread ends with its one read

    def load(self, spark: SparkSession, cfg: Config, batch_id: int) -> None:
        """The batches of the window before `batch_id`, from the tables: once per stream (the first
        batch it runs, which may be a restart's), from the read `preload` started where it covers them."""
        if self.loaded:
            return
        self.loaded = True
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None and batch_id in (preloaded[0], preloaded[0] + 1):
            read = preloaded[1].result()
            self.batches = {n: b for n, b in read.items() if self.first(batch_id) <= n < batch_id}
        else:
            self.batches = self._read(spark, cfg, self.first(batch_id), batch_id - 1)

    def _read(self, spark: SparkSession, cfg: Config, first: int, last: int) -> dict[int, _WindowBatch]:
        """Batches `first`..`last` of the window as the tables hold them."""
        app = cfg.streaming.app_id
        earlier = (F.col("app_id") == app) & F.col("batch_id").between(first, last)
        users: dict[int, int] = {}
        if output_table_exists(spark, cfg.output, BATCHES):
            for row in read_output_table(spark, cfg.output, BATCHES).where(earlier).select("batch_id", "users").collect():
                users[int(row.batch_id)] = int(row.users or 0)
        counts: dict[int, int] = {}
        lowest: dict[int, list[WindowOutlier]] = {}
        if output_table_exists(spark, cfg.output, OUTLIERS):
            rows = read_output_table(spark, cfg.output, OUTLIERS).where(earlier)
            order = Window.partitionBy("batch_id").orderBy(F.xxhash64("user_id"), "user_id")
            ranked = (rows.withColumn("_n", F.row_number().over(order))
                      .withColumn("_outliers", F.count(F.lit(1)).over(Window.partitionBy("batch_id"))))
            table = self._query(ranked.where(F.col("_n") <= self.max_users), "_outliers").toArrow()
            for outlier, count in zip(self._rows(table), table["_outliers"].to_pylist(), strict=True):
                counts[outlier.batch_id] = int(count)
                lowest.setdefault(outlier.batch_id, []).append(outlier)
        return {
            batch: _WindowBatch(users.get(batch, 0), counts.get(batch, 0),
                                sorted(lowest.get(batch, []), key=lambda o: (o.rank, o.user_id)))
            for batch in sorted(set(users) | set(counts))
        }

    def add(self, batch_id: int, users: int, outliers: int, rows: DataFrame) -> None:
        """Batch `batch_id`'s users and outliers, and its lowest outliers from `rows` (its
        `outlier_rows`, one small query); a replayed batch's entry is made again, the same."""
        lowest = self._rows(self._query(rows).orderBy("_rank", "user_id").limit(self.max_users).toArrow())
        self.batches[batch_id] = _WindowBatch(users, outliers, lowest)
        for old in [b for b in self.batches if b < self.first(batch_id)]:
            del self.batches[old]

    def counts(self, batch_id: int) -> tuple[int, int]:
        """(users scored, outlier rows) of the window that ends with `batch_id`."""
        inside = [b for n, b in self.batches.items() if self.first(batch_id) <= n <= batch_id]
        return sum(b.users for b in inside), sum(b.outliers for b in inside)

    def sample(self, batch_id: int) -> list[WindowOutlier]:
        """The window's outliers for the fit: the latest row of each user (its newest embedding and
        features), at most max_users of them chosen by a hash of user_id (the same users on a
        replay), sorted by user_id so that the fit sees them in one order."""
        latest: dict[str, WindowOutlier] = {}
        for n in sorted(self.batches):
            if self.first(batch_id) <= n <= batch_id:
                latest.update((o.user_id, o) for o in self.batches[n].lowest)
        picked = sorted(latest.values(), key=lambda o: (o.rank, o.user_id))[: self.max_users]
        return sorted(picked, key=lambda o: o.user_id)

    def _query(self, rows: DataFrame, *extra: str) -> DataFrame:
        """The window's columns of stream_outliers rows, their features in `names` order: from
        `outlier_rows`' array (a batch's own rows), else from the table's maps (read back once per
        stream), as the map's values where its keys are `names` in order (`outlier_rows` writes them
        so), otherwise as the map itself (`BY_NAME`), which `_rows` reads by name. Looked up by name in
        the query, 53 features made a batch's query 3x slower (2,500 rows: 0.29-0.34 s against 0.10-0.12
        s from an array) and a restart's read of 10,000 rows 0.96-1.06 s against 0.15-0.22 s."""
        by_name = []
        if VALUES in rows.columns:
            values = F.col(VALUES)
        elif self.names:
            in_order = F.coalesce(F.map_keys("features") == F.array(*[F.lit(n) for n in self.names]), F.lit(False))
            values = F.when(in_order, F.map_values("features"))
            by_name = [F.when(~in_order, F.col("features")).alias(BY_NAME)]
        else:
            values = F.array().cast("array<double>")
        return rows.select("batch_id", "user_id", F.xxhash64("user_id").alias("_rank"),
                           F.col("embedding").cast("array<double>").alias("embedding"),
                           values.cast("array<double>").alias("_values"), *by_name, *extra)

    def _rows(self, table) -> list[WindowOutlier]:
        if table.num_rows == 0:
            return []
        values = table["_values"]
        if BY_NAME in table.column_names and values.null_count:  # maps whose keys are not `names` in order
            maps = table[BY_NAME].to_pylist()  # a map as (key, value) pairs; None: no map
            values = pa.chunked_array([[row if row is not None else [dict(maps[i] or ()).get(n) for n in self.names]
                                        for i, row in enumerate(values.to_pylist())]], pa.list_(pa.float64()))
        embeddings, values = _matrix(table["embedding"]), _matrix(values)
        return [
            WindowOutlier(user_id, int(batch), int(rank), embeddings[i], values[i], self.names)
            for i, (user_id, batch, rank) in enumerate(zip(table["user_id"].to_pylist(), table["batch_id"].to_pylist(),
                                                           table["_rank"].to_pylist(), strict=True))
        ]


def _matrix(column) -> np.ndarray | list[np.ndarray]:
    """An Arrow column of lists of doubles as a (rows x length) float64 matrix (null elements NaN), or
    one array per row where the lists differ in length or are missing."""
    lists = column.combine_chunks()
    lengths = np.diff(lists.offsets.to_numpy())
    if lists.null_count or (lengths != lengths[0]).any():
        return [np.asarray(v if v is not None else [], dtype=np.float64) for v in lists.to_pylist()]
    flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    return flat.reshape(len(lists), int(lengths[0]))


def reference_points(points: np.ndarray | None, limit: int) -> np.ndarray | None:
    """At most `limit` of the training users' embeddings (the deep model's HDBSCAN fitting sample,
    itself a hash sample of the users), evenly strided so that the same bundle always gives the same."""
    if points is None or len(points) == 0:
        return None
    stride = -(-len(points) // limit)
    return np.asarray(points[::stride], dtype=np.float64)


def find_candidates(sample: Sequence, settings: EmergingConfig, population: Population,
                    reference: np.ndarray | None = None, category_labels: Mapping[str, str] | None = None) -> list[Candidate]:
    """HDBSCAN on the sample's embeddings (rows with user_id, embedding, features) together with the
    `reference` training embeddings; each cluster with at least min_cluster_size outliers that make
    at least min_outlier_share of it is a candidate, with its outliers' feature means, z-scores
    against the training users and a segment-style name.

    Why the training users join the fit: the outliers alone have no context. One new group among a
    few scattered outliers is the whole hierarchy's root, which HDBSCAN (eom) never selects, so it
    comes out as noise; and a group of outliers at the edge of a known segment would look new. With
    the known segments' users present the new group is one cluster among theirs, and its members'
    origin tells it from a known segment."""
    import hdbscan

    outliers = len(sample)
    if outliers < settings.min_cluster_size:
        log.info("emerging segments: %d outliers in the window, fewer than min_cluster_size %d", outliers,
                 settings.min_cluster_size)
        return []
    embeddings = np.array([row.embedding for row in sample], dtype=np.float64)
    points = embeddings if reference is None else np.vstack([embeddings, reference])
    # The deep model's settings style (models.hdbscan). Not density.fit_hdbscan: the candidates are
    # never used to assign users, so the prediction artifact it builds would be wasted.
    labels = hdbscan.HDBSCAN(
        min_cluster_size=settings.min_cluster_size, min_samples=settings.min_samples,
        cluster_selection_method=settings.cluster_selection_method, core_dist_n_jobs=1,
    ).fit(points).labels_
    mine, theirs = labels[:outliers], labels[outliers:]
    names = list(population.means)
    profiles, members, known = [], {}, {}
    for label in sorted(set(int(x) for x in mine) - {NOISE_SEGMENT}):
        index = np.flatnonzero(mine == label)
        known[label] = int((theirs == label).sum())
        if len(index) < settings.min_cluster_size or len(index) < settings.min_outlier_share * (len(index) + known[label]):
            continue
        members[label] = sorted(sample[i].user_id for i in index)
        rows = [sample[i].features for i in index]
        means = {n: _mean([r.get(n) for r in rows]) for n in names}
        zscores = {n: _zscore(means[n], population.means[n], population.stds[n]) for n in names}
        profiles.append(SegmentProfile(label, "", len(index), len(index) / outliers, means, zscores,
                                       ranked(zscores)[:TOP_FEATURES]))
    labelled = segment_names(profiles, population.means, category_labels)
    return [Candidate(p.segment, labelled[p.segment], p.size, p.means, p.zscores, p.top_features,
                      known[p.segment], members[p.segment]) for p in profiles]


def detect(
    spark: SparkSession,
    cfg: Config,
    *,
    batch_id: int,
    as_of: dt.date | None,
    assignments: Mapping[str, DataFrame],
    embeddings: DataFrame | None,
    prepared: DataFrame,
    features: DataFrame,
    feature_names: Sequence[str],
    population: Population,
    thresholds: Mapping[str, float | None],
    reference: np.ndarray | None,
    category_labels: Mapping[str, str] | None,
    window: OutlierWindow,
    commit_metadata: Mapping[str, str] | None = None,
) -> Finding | None:
    """The emerging-segment check of one batch (module docstring); writes its `stream_outliers` and
    `candidate_segments` commits once per batch id, and keeps `window` (the stream's, made with
    `feature_names`) up to date. None when streaming.drift.emerging is off."""
    settings = cfg.streaming.drift.emerging
    if not settings.enabled:
        return None
    app = cfg.streaming.app_id
    if tuple(feature_names) != window.names:  # the window reads the rows' features by position
        raise ValueError(f"emerging segments: the window's features {window.names} are not {tuple(feature_names)}")
    models = [m for m in settings.outlier_models if m in assignments]
    flags = outlier_flags(assignments, {m: thresholds.get(m) for m in models})
    vectors, space = vectors_of(embeddings, prepared)
    if flags is None:  # the bundle has none of the outlier models: the window stays empty
        log.warning("emerging segments: the bundle scores none of streaming.drift.emerging.outlier_models %s",
                    settings.outlier_models)
        flags = spark.createDataFrame([], "user_id string, models array<string>")
    # Materialised once: the write and the window's query of the batch's lowest outliers both read
    # them (the query computed the flags' aggregation and two joins again, 0.44 of a 100k-event
    # batch's 1.3-1.5 s here).
    rows = outlier_rows(flags, vectors, features, feature_names, app, batch_id, as_of).localCheckpoint()
    written = write_rows(spark, cfg.output, OUTLIERS, table_columns(rows), txn=(TABLES[OUTLIERS].txn_app(app), batch_id),
                         commit_metadata=commit_metadata)
    window.load(spark, cfg, batch_id)
    # The rows just written (a count of their files' records), or counted where the write was skipped
    # (a replay) or went through the connector, which does not say.
    outliers = written.rows if not written.skipped and written.rows >= 0 else rows.count()
    window.add(batch_id, features.count(), outliers, rows)
    users, outliers = window.counts(batch_id)
    finding = Finding(models, users, outliers, space)
    if finding.share > settings.outlier_share:
        sample = window.sample(batch_id)
        finding.clustered = len(sample)
        # The training embeddings share the outliers' space only when that space is the autoencoder's.
        known = reference_points(reference, settings.max_users) if space == EMBEDDINGS_SPACE else None
        finding.candidates = find_candidates(sample, settings, population, known, category_labels)
        log.info("emerging segments: batch %d, %d outliers of %d users in the last %d batches (%.1f%%, threshold "
                 "%.0f%%): %d clustered, candidates %s", batch_id, outliers, users, settings.window_batches,
                 100 * finding.share, 100 * settings.outlier_share, len(sample),
                 [(c.name, c.size) for c in finding.candidates] or "none")
    now = dt.datetime.now(dt.UTC)
    rows = [
        CandidateSegmentRow(
            app_id=app, batch_id=batch_id, as_of=as_of, candidate=c.candidate, segment_name=c.name, size=c.size,
            training_members=c.training_members, window_outliers=finding.clustered, window_users=users, space=space,
            user_ids=list(c.user_ids), top_features=list(c.top_features),
            feature_means=dict(c.means), feature_zscores=dict(c.zscores), created_at=now,
        )
        for c in finding.candidates
    ]
    write_rows(spark, cfg.output, CANDIDATES, rows, txn=(TABLES[CANDIDATES].txn_app(app), batch_id),
               commit_metadata=commit_metadata)
    return finding


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    return sum(present) / len(present) if present else None


def _zscore(mean: float | None, pop_mean: float | None, pop_std: float | None) -> float | None:
    # As segment_profiles: 0 where the training users do not vary or a mean is missing.
    if mean is None or pop_mean is None or not pop_std:
        return 0.0
    return (mean - pop_mean) / pop_std


__all__ = ["Candidate", "Finding", "OutlierWindow", "Population", "WindowOutlier", "detect", "find_candidates",
           "outlier_flags", "outlier_rows", "population", "reference_points", "table_columns", "training_thresholds",
           "vectors_of"]
