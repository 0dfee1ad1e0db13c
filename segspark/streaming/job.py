"""`segspark stream`: streaming segment assignment, incremental features and clustering, drift.

For every micro-batch of the landing folder (or Kafka), exactly once per batch id:

1. ingest: the batch rules and quarantine (`micro_batch`: tagged and counted first, the quarantine
   rows committed after the assignments);
2. state: the batch's per-user aggregates merged into the feature state (`feature_state`), a Delta
   table partitioned by a hash bucket of user_id: the touched users' new rows are appended, and now
   and then a batch compacts the table to one row per user (`state_store`);
3. assignment: the touched users' features from the merged state, as of the date the stream has
   reached (the newest event day seen), scored with every model of the bundle and appended to
   `user_segments_live`; the latest batch_id per (user_id, model) is a user's current segment;
4. online clustering: the k-means centres move by the batch's per-cluster sums and counts with
   Spark StreamingKMeans' decay rule (`online_kmeans`); each batch appends a snapshot of them to
   `segment_centroids_online`, and `kmeans_online` assignments use them with the bundle's stable
   segment ids;
5. emerging segments: the batch's outliers (noise, anomalies) join a window of recent ones in
   `stream_outliers`; when they pass a share of the window's users, HDBSCAN on their embeddings
   proposes candidate segments in `candidate_segments` (`emerging`); the live models are unchanged;
6. drift: PSI of the main features, centroid shift, segment size change and noise share against the
   training run, with a retrain recommendation (which also names the emerging candidates), to
   `segment_drift`, logged as a warning when set;
7. `stream_batches`: one row per batch (counts, as-of date, seconds), and the stream's `runs` row.

The live assignments (3) are committed as soon as they are known, before the state's buckets (2)
and the centres' snapshot (4), which they do not need: a file's latency runs to them
(`BatchReport.assigned_at`). Those two writes then run beside the emerging check (5), and the drift
(6) waits for them. Each table's commit carries the Delta transaction (`<app_id>.<table>`,
batch id) and is skipped when `transaction_version` shows it was already committed: a batch that
Spark re-runs after a crash (its offsets were logged, its commit was not) finishes what is missing
and duplicates nothing. The app id comes from the config; each commit also records the checkpoint's query id, and
a stream whose checkpoint does not own the app's commits (a reset checkpoint, another stream's) is
refused before its first batch, as is a second live stream on the same app_id (`identity`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from segspark.bundle.manifest import Manifest, SigningKey, open_bundle
from segspark.bundle.store import (
    LoadedBundle,
    bundle_signing,
    bundle_slots,
    load_bundle,
    prepare_with_bundle,
    score_prepared,
)
from segspark.config import Config
from segspark.errors import ConfigError
from segspark.features.behaviour import FeatureSlots
from segspark.features.catalog import category_slot_names, feature_columns
from segspark.ingest.privacy import Protection, check_same_pseudonyms, resolve_protection
from segspark.io.catalog import (
    TABLES,
    USER_SEGMENTS_LIVE,
    CentroidRow,
    DriftRow,
    RunRow,
    StreamBatchRow,
    stream_tables,
)
from segspark.io.tables import (
    committed_version,
    output_table_exists,
    read_output_table,
    table_path,
    uses_catalog,
    write_rows,
)
from segspark.models import registry
from segspark.models.contract import NOISE_SEGMENT
from segspark.models.prepare import PREPARED_VECTOR
from segspark.runtime.expressions import jvm_context, memoised
from segspark.runtime.session import apply_required_conf, is_connect, share_session
from segspark.runtime.shuffle_sizing import sized_for_block, sizing_is_on
from segspark.streaming import drift, emerging, identity, mqtt_landing, state_store
from segspark.streaming.feature_state import VERSION, batch_state, join_by_user, state_features
from segspark.streaming.micro_batch import IngestedBatch, commit_quarantine, start_stream, tag_micro_batch
from segspark.streaming.online_kmeans import POINT, OnlineKMeans, as_points, batch_statistics, nearest_centre
from segspark.streaming.state_store import BUCKET, StateLog, bucket_of

log = logging.getLogger(__name__)

STATE = state_store.STATE
LIVE, CENTROIDS, DRIFT, BATCHES = "user_segments_live", "segment_centroids_online", "segment_drift", "stream_batches"
NOISE_MODELS = {m.name for m in registry.MODELS if m.noise}  # their segment -1 is noise
ONLINE_BASE = registry.online_base().name  # the bundle's model whose centres are updated online
ONLINE_MODEL = f"{ONLINE_BASE}_online"
BUCKETS = "buckets"  # the ingest's list of the buckets a batch touches
# Each table the stream writes -> the suffix of its txn app id (`<app_id>.<suffix>`), from the catalog.
STREAM_TXNS = {table.name: table.txn_suffix for table in stream_tables()}


@dataclass
class StreamModels:
    """What every batch needs from the training run, loaded once when the stream starts."""

    bundle: str
    loaded: LoadedBundle  # preparation and models, loaded once
    slots: FeatureSlots
    reference: drift.ReferenceBins
    trained_shares: dict[str, dict[int, float]]  # model -> stable segment -> share of training users
    trained_centres: np.ndarray | None  # kmeans centres (prepared space), in cluster order
    kmeans_ids: dict[int, int]  # kmeans cluster -> stable segment id
    kmeans_names: dict[int, str]
    online: OnlineKMeans | None
    online_batch: int | None = None  # the batch id the online model includes (its snapshot's)
    as_of: dt.date | None = None  # the stream's as-of date so far (the newest event day committed)
    query_id: str | None = None  # the checkpoint's query id, recorded with every commit
    # Emerging segments: the training users' feature means and stds (candidates' z-scores), the
    # category slots' values (their names); None when streaming.drift.emerging is off.
    population: emerging.Population | None = None
    outlier_thresholds: dict[str, float | None] = field(default_factory=dict)  # model -> anomaly score gate
    training_embeddings: np.ndarray | None = None  # the deep model's HDBSCAN sample of training users
    category_labels: dict[str, str] = field(default_factory=dict)
    outlier_window: emerging.OutlierWindow | None = None  # the emerging check's window (None: off)
    state_log: StateLog = field(default_factory=StateLog)  # the state table's rows: when a batch compacts

    def commit_metadata(self, app_id: str) -> dict[str, str]:
        return identity.commit_metadata(app_id, self.query_id)


@dataclass
class BatchReport:
    batch_id: int
    input_rows: int = 0
    clean_rows: int = 0
    quarantined_rows: int = 0
    users: int = 0
    as_of: dt.date | None = None
    retrain_recommended: bool = False
    reasons: list[str] = field(default_factory=list)
    skipped: bool = False  # every table already held this batch
    seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)
    # When the batch's live assignments were committed (epoch seconds; None: nothing assigned): what
    # a file's or message's latency runs to, since the later commits do not change what users see.
    assigned_at: float | None = None
    shuffle_partitions: int | None = None  # sized from the batch (None: the session's own setting)
    state_compacted: bool | None = None  # the batch compacted the feature state (None: it wrote no state)

    @contextmanager
    def step(self, name: str):
        # Listed in the order the steps started (the state's write and the emerging check overlap).
        self.step_seconds.setdefault(name, 0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.step_seconds[name] = round(time.perf_counter() - start, 3)


def latest_bundle(spark: SparkSession, cfg: Config) -> str:
    """The bundle of the latest successful training run (runs.metrics.bundle.path)."""
    if output_table_exists(spark, cfg.output, "runs"):
        trained = (
            read_output_table(spark, cfg.output, "runs")
            .where((F.col("status") == "succeeded") & F.get_json_object("metrics", "$.bundle.path").isNotNull())
            .orderBy(F.col("finished_at").desc())
            .select(F.get_json_object("metrics", "$.bundle.path").alias("path"))
            .limit(1)
            .collect()
        )
        if trained:
            return trained[0].path
    raise ConfigError(
        f"stream: no trained model bundle under output.root={cfg.output.root!r}; run `segspark run` (or "
        "`segspark train`) first, or set streaming.bundle to a bundle directory"
    )


@dataclass(frozen=True)
class TrainedInputs:
    """What a stream reads from its bundle and training run, the same at every start of a stream on
    that bundle with the same settings: a session keeps it (`trained_inputs`)."""

    loaded: LoadedBundle
    slots: FeatureSlots
    reference: drift.ReferenceBins
    trained_shares: dict[str, dict[int, float]]
    population: emerging.Population | None
    outlier_thresholds: dict[str, float | None]
    training_embeddings: np.ndarray | None
    category_labels: dict[str, str]


# (bundle, its content, the settings read) -> (the JVM context, TrainedInputs) of this session's last
# stream starts: a query restarted in the same session (a notebook, a job that restarts its stream
# after a failure) loaded the bundle's models, read the training tables four times and built the
# scoring again, 3.9-4.1 s of every warm start (bench bundle, local[2]). A few are kept: each holds
# loaded models and the deep model's sample of training embeddings.
_TRAINED: OrderedDict[tuple, tuple[object, TrainedInputs]] = OrderedDict()
_TRAINED_KEPT = 4
_TRAINED_LOCK = threading.Lock()


def trained_inputs(spark: SparkSession, cfg: Config, bundle: str) -> TrainedInputs:
    """The bundle verified (checksums, and the signature with a key: at every start), then its models
    and training inputs: loaded at a stream's first start in this session, reused by later starts on
    the same bundle content and settings."""
    signing = bundle_signing(cfg.bundle)
    manifest = open_bundle(bundle, signing=signing)
    key = (str(manifest.path.resolve()), manifest.content_sha256, cfg.output.model_dump_json(),
           cfg.features.model_dump_json(), cfg.streaming.drift.model_dump_json())
    # Classic: the session's JVM; Spark Connect: the session itself (its MLlib models live on its server).
    context = spark if is_connect(spark) else jvm_context()
    with _TRAINED_LOCK:
        kept = _TRAINED.get(key)
        if kept is not None and kept[0] is context:
            _TRAINED.move_to_end(key)
            log.info("stream: bundle %s (run %s) as loaded by an earlier start in this session", bundle, manifest.run_id)
            return kept[1]
    trained = _load_trained(spark, cfg, bundle, manifest, signing)
    with _TRAINED_LOCK:
        _TRAINED[key] = (context, trained)
        while len(_TRAINED) > _TRAINED_KEPT:
            _TRAINED.popitem(last=False)
    return trained


def _load_trained(spark: SparkSession, cfg: Config, bundle: str, manifest: Manifest,
                  signing: SigningKey | None) -> TrainedInputs:
    """`trained_inputs`' loading, from the bundle's `manifest` that it has just verified (with `signing`)."""
    loaded = load_bundle(bundle, signing, manifest)
    slots = bundle_slots(bundle, signing, manifest)
    if slots is None:
        raise ConfigError(f"stream: bundle {bundle} does not record its feature slots; retrain with this version")
    run_id = manifest.run_id
    training = read_output_table(spark, cfg.output, "user_features").where(F.col("run_id") == run_id)
    trained_segments = read_output_table(spark, cfg.output, "user_segments").where(F.col("run_id") == run_id)
    reference = drift.reference_bins(training, cfg.streaming.drift.features, cfg.streaming.drift.bins)
    population, thresholds = None, {}
    settings = cfg.streaming.drift.emerging
    if settings.enabled:
        population = emerging.population(training, feature_columns(cfg.features))
        thresholds = emerging.training_thresholds(
            trained_segments, [m for m in settings.outlier_models if m in manifest.models], settings.anomaly_quantile)
    shares: dict[str, dict[int, float]] = {}
    for row in trained_segments.groupBy("model", "segment").count().collect():
        shares.setdefault(row.model, {})[int(row.segment)] = int(row["count"])
    shares = {m: {s: n / sum(c.values()) for s, n in c.items()} for m, c in shares.items()}
    _build_scoring(loaded, training)
    return TrainedInputs(
        loaded=loaded, slots=slots, reference=reference, trained_shares=shares, population=population,
        outlier_thresholds=thresholds, training_embeddings=_training_embeddings(loaded),
        category_labels=dict(zip(category_slot_names(cfg.features), slots.categories, strict=False)),
    )


def load_stream_models(spark: SparkSession, cfg: Config, bundle: str, last_batch: int | None = None) -> StreamModels:
    """What the stream's batches need from the training run (`StreamModels`): the session's
    `trained_inputs`, and what a start reads anew (the online centres' latest snapshot, the as-of
    date, the state table's size). `last_batch`: the last batch the stream's checkpoint planned (a
    restart), whose emerging window is read back meanwhile."""
    trained = trained_inputs(spark, cfg, bundle)
    loaded, manifest = trained.loaded, trained.loaded.manifest
    window = None
    if trained.population is not None:
        window = emerging.OutlierWindow(list(trained.population.means), cfg.streaming.drift.emerging)
        if last_batch is not None:
            window.preload(spark, cfg, last_batch)
    centres, ids, names, online, online_batch = None, {}, {}, None, None
    if ONLINE_BASE in manifest.models:
        saved = loaded.models[ONLINE_BASE]
        centres = np.array(saved.fitted.centroids, dtype=np.float64)
        ids, names = dict(saved.segment_ids), dict(saved.segment_names)
        online, online_batch = _latest_snapshot(spark, cfg, manifest, ids)
        if online is None:
            online = OnlineKMeans(centres.copy(), np.array(saved.fitted.cluster_sizes, dtype=np.float64),
                                  decay=cfg.streaming.decay, time_unit=cfg.streaming.time_unit)
    return StreamModels(
        bundle=bundle, loaded=loaded, slots=trained.slots, reference=trained.reference,
        trained_shares=trained.trained_shares, trained_centres=centres, kmeans_ids=ids, kmeans_names=names,
        online=online, online_batch=online_batch, as_of=_previous_as_of(spark, cfg), population=trained.population,
        outlier_thresholds=trained.outlier_thresholds, training_embeddings=trained.training_embeddings,
        category_labels=trained.category_labels, outlier_window=window, state_log=StateLog.of_table(spark, cfg),
    )


def _build_scoring(loaded: LoadedBundle, training: DataFrame) -> None:
    """Build, before the query starts, what the first batch would otherwise build: the preparation's and
    each model's scoring expressions, memoised per loaded bundle (`memoised`), from the training
    features' empty frame (their schema is the bundle's feature spec). No Spark job runs and nothing is
    written; on the streaming bench a new query's first batch had spent 0.5 s building them before its
    assignments."""
    missing, wrong = loaded.manifest.feature_spec().problems(training.schema)
    if missing or wrong:  # the output root's features are not the bundle's: the first batch builds them
        return
    for frame in score_prepared(loaded, prepare_with_bundle(loaded, training.limit(0))).cached:
        frame.unpersist()  # persisted lazily: nothing was stored


def _training_embeddings(loaded: LoadedBundle) -> np.ndarray | None:
    """The embeddings of the training users the deep model's HDBSCAN was fitted on (kept in the bundle
    to assign new users), if the bundle has that model: emerging segments cluster against them."""
    model = registry.producer("user_embeddings").name
    saved = loaded.models.get(model)
    density = getattr(saved.fitted, "density", None) if saved is not None else None
    return getattr(density, "points", None)


def _latest_snapshot(spark, cfg: Config, manifest: Manifest, ids: dict[int, int]):
    if not output_table_exists(spark, cfg.output, CENTROIDS):
        return None, None
    app = cfg.streaming.app_id
    rows = read_output_table(spark, cfg.output, CENTROIDS).where(F.col("app_id") == app)
    last = rows.agg(F.max("batch_id")).first()[0]
    if last is None:
        return None, None
    by_segment = {r.segment: r for r in rows.where(F.col("batch_id") == last).collect()}
    order = [ids[j] for j in sorted(ids)]
    if set(by_segment) != set(order):
        raise ConfigError(
            f"stream: the online centres of app {app!r} (segments {sorted(by_segment)}) are not those of bundle "
            f"run {manifest.run_id} (segments {sorted(order)}); set a new streaming.app_id for a new bundle"
        )
    online = OnlineKMeans(
        np.array([by_segment[s].centroid for s in order]), np.array([by_segment[s].weight for s in order]),
        decay=cfg.streaming.decay, time_unit=cfg.streaming.time_unit, batches=int(last) + 1,
    )
    log.info("stream: online k-means resumed from the snapshot of batch %d", last)
    return online, int(last)


def _done(cfg: Config, name: str, batch_id: int) -> bool:
    """True when the stream's txn in table `name` already reaches `batch_id` (a replayed batch)."""
    version = committed_version(cfg.output, name, TABLES[name].txn_app(cfg.streaming.app_id))
    return version is not None and version >= batch_id


def process_batch(spark: SparkSession, cfg: Config, models: StreamModels, records: DataFrame, batch_id: int,
                  protection: Protection | None = None) -> BatchReport:
    """Everything one micro-batch does (module docstring), each table exactly once."""
    started, started_at = time.perf_counter(), time.time()
    report = BatchReport(batch_id)
    if not sizing_is_on(spark, cfg.spark):
        return _process_batch(spark, cfg, models, records, report, protection, started, started_at)
    # spark.shuffle_partitions auto: the batch's shuffles sized from its own files, as a batch run's
    # (and adaptive execution off for a batch of one partition: shuffle_sizing.settings_for).
    # Micro-batches of 10k events (the streaming bench's files, a session launched with 16 partitions)
    # committed their assignments after 4.4-4.5 s on average with one partition, 5.2-6.2 s with 16
    # (three alternated runs each): 16 near-empty tasks per stage, in every job of the batch.
    with sized_for_block(records, cfg.input.format, spark, records.sparkSession) as partitions:
        report.shuffle_partitions = partitions
        return _process_batch(spark, cfg, models, records, report, protection, started, started_at)


def _process_batch(spark: SparkSession, cfg: Config, models: StreamModels, records: DataFrame, report: BatchReport,
                   protection: Protection | None, started: float, started_at: float) -> BatchReport:
    app, batch_id = cfg.streaming.app_id, report.batch_id
    with report.step("ingest"):
        # The same pass counts the records and lists the state buckets the batch's users fall in.
        ingested = tag_micro_batch(spark, cfg, records, batch_id, protection,
                                   clean_aggregates={BUCKETS: F.collect_set(bucket_of(cfg))})
    try:
        report.input_rows, report.clean_rows = ingested.input_rows, ingested.clean_rows
        report.quarantined_rows = ingested.quarantined_rows
        if _done(cfg, BATCHES, batch_id):
            log.info("stream batch %d: already committed in every table, skipped", batch_id)
            report.skipped = True
            return report
        if ingested.clean_rows:
            _assign(spark, cfg, models, ingested, batch_id, report)
        else:  # nothing to assign (every record quarantined): the stream stays where it was
            report.as_of = models.as_of
        with report.step("quarantine"):  # after the assignments, which do not need it
            commit_quarantine(spark, cfg, ingested, commit_metadata=models.commit_metadata(app))
        report.seconds = time.perf_counter() - started
        _write_batch_row(spark, cfg, report, models)
        models.as_of = report.as_of
    finally:
        ingested.unpersist()
    assigned = f", assignments committed after {report.assigned_at - started_at:.1f} s" if report.assigned_at else ""
    sized = f", {report.shuffle_partitions} shuffle partitions" if report.shuffle_partitions else ""
    log.info(
        "stream batch %d: %d records, %d users assigned as of %s in %.1f s%s%s (%s)%s", batch_id, report.input_rows,
        report.users, report.as_of, report.seconds, assigned, sized,
        ", ".join(f"{k} {v:.1f} s" for k, v in report.step_seconds.items()),
        " - RETRAIN RECOMMENDED" if report.retrain_recommended else "",
    )
    return report


def _assign(spark, cfg: Config, models: StreamModels, ingested: IngestedBatch, batch_id: int,
            report: BatchReport) -> None:
    """The batch's state, features and assignments. The live assignments are committed first, as
    soon as they are known: the writes they do not need (the state's buckets, the online centres'
    snapshot) come after them, beside the emerging check, then the drift. Each table has its own
    transaction, so a batch re-run after a crash between two commits recomputes the same rows from
    the state as it was (the merge reads the state only while its commit is missing) and writes only
    what is missing."""
    app = cfg.streaming.app_id
    # The batch's intermediate frames are materialised with localCheckpoint, not persist: their plans
    # (merges, windows, higher-order functions, five models) are deep, and every frame derived from a
    # persisted one is analysed and matched against the cache over the whole plan again, which cost
    # minutes per batch; a checkpoint's plan is a scan of its blocks. Losing an executor fails the
    # batch, and the restarted query redoes it exactly once.
    cached: list[DataFrame] = []
    try:
        with report.step("batch_state"):
            events = _by_user(spark, ingested.clean)
            batch = batch_state(events, cfg.features, models.slots).withColumn(BUCKET, bucket_of(cfg)).localCheckpoint()
            buckets = sorted(ingested.clean_values[BUCKETS])
        with report.step("state_merge"):
            if _done(cfg, STATE, batch_id):  # a replay: the state holds this batch already
                touched = state_store.stored_rows_of(spark, cfg, batch, buckets, models.state_log)
                touched = touched.drop(VERSION).localCheckpoint()
                update = None
            else:
                update = state_store.merge_batch(spark, cfg, models.state_log, batch, buckets, batch_id, models.slots)
                touched = update.touched
        with report.step("features"):
            report.as_of = _stream_as_of(models, ingested.last_day)
            features = state_features(touched.drop(BUCKET), report.as_of, cfg.features, models.slots).localCheckpoint()
            # Prepared once: the online centres, every model of the bundle and the emerging check read it.
            prepared = prepare_with_bundle(models.loaded, features).localCheckpoint()
        with report.step("online_kmeans"):
            online, centres = _online_assignments(cfg, models, prepared, batch_id)
        with report.step("score"):
            scored = score_prepared(models.loaded, prepared)
            cached += scored.cached
            assignments = dict(scored.assignments)
            if online is not None:
                assignments[ONLINE_MODEL] = online
            # Every model scored once (one job), with the users' latest event: the live rows, the
            # emerging check and the drift read it.
            latest = touched.select("user_id", F.col("last_event").alias("latest_event_time"))
            scores = join_by_user(_model_scores(assignments), latest, "left").localCheckpoint()
            write_rows(spark, cfg.output, LIVE, _live_rows(scores, report.as_of, app, batch_id),
                       txn=(TABLES[LIVE].txn_app(app), batch_id), commit_metadata=models.commit_metadata(app))
            report.assigned_at = time.time()
        # The state's and the centres' writes need nothing the emerging check computes: they run beside
        # it (a batch's one shuffle partition leaves a core to them; a compacting 100k-event batch's
        # write, 1.1-1.4 s, hides behind the check, an appending one's little, as the two share the
        # driver). The drift waits for them, so its commit stays after the state's; leaving the pool
        # waits for the writes also when the emerging check fails.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segspark-state-write",
                                initializer=share_session, initargs=(spark,)) as background:
            state_written = background.submit(_write_state, spark, cfg, models, update, centres, report)
            with report.step("emerging"):
                bundle_scores = {m: scores.where(F.col("model") == m) for m in scored.assignments}
                finding = _emerging(spark, cfg, models, bundle_scores, scored.outputs, prepared, features, batch_id,
                                    report.as_of)
        state_written.result()  # the writes' own error, if any
        with report.step("drift"):
            _drift(spark, cfg, models, features, scores, batch_id, report, finding)
    finally:
        for frame in cached:
            frame.unpersist()


def _write_state(spark, cfg: Config, models: StreamModels, update: state_store.StateUpdate | None,
                 centres: list[CentroidRow], report: BatchReport) -> None:
    """Commit the batch's merged feature state (`update`; None: a replay found it committed) and the
    online centres' snapshot, each in its own transaction."""
    app, batch_id = cfg.streaming.app_id, report.batch_id
    with report.step("state_write"):
        if update is not None:
            written = write_rows(
                spark, cfg.output, STATE, update.rows, partitions=update.replaced,
                txn=(TABLES[STATE].txn_app(app), batch_id), commit_metadata=models.commit_metadata(app),
            )
            rows = written.rows if written.rows >= 0 else update.rows.count()  # -1: the connector's write
            models.state_log.wrote(update, rows)
            report.state_compacted = update.compaction
            log.info("stream batch %d: feature state %s (%d rows)", batch_id,
                     "compacted" if update.compaction else "appended", rows)
        if centres:
            write_rows(spark, cfg.output, CENTROIDS, centres, txn=(TABLES[CENTROIDS].txn_app(app), batch_id),
                       commit_metadata=models.commit_metadata(app))


def _by_user(spark: SparkSession, frame: DataFrame) -> DataFrame:
    """`frame` hash-partitioned by user_id into the session's shuffle partitions: the batch's events,
    before their per-user aggregates are checkpointed. Without adaptive execution the
    checkpoints keep that partitioning, and the state's joins, aggregations and windows, all by user,
    need no further shuffle; under AQE (the default) a checkpoint's plan does not report it, and
    each of them shuffles its small input by user again. Where a frame already is partitioned so
    (the ingest's cached events are), Spark leaves the repartition out of the plan."""
    value = str(spark.conf.get("spark.sql.shuffle.partitions", "200"))
    return frame.repartition(int(value) if value.isdigit() else 200, "user_id")


def _stream_as_of(models: StreamModels, newest: dt.date) -> dt.date:
    """The UTC day of the newest event the stream has seen: the batch's (`newest`, from its ingest),
    or an earlier batch's. The state holds nothing newer than these: it is made of the batches."""
    return models.as_of if models.as_of is not None and models.as_of > newest else newest


def _previous_as_of(spark, cfg: Config) -> dt.date | None:
    """The as-of date of the last committed batch (when the stream starts; then kept in memory)."""
    if not output_table_exists(spark, cfg.output, BATCHES):
        return None
    batches = read_output_table(spark, cfg.output, BATCHES)
    return batches.where(F.col("app_id") == cfg.streaming.app_id).agg(F.max("as_of")).first()[0]


def _online_assignments(cfg: Config, models: StreamModels, prepared: DataFrame,
                        batch_id: int) -> tuple[DataFrame | None, list[CentroidRow]]:
    """Move the online centres by the batch's prepared users (unless its snapshot is in already) and
    assign the users to the nearest one (stable ids of the bundle's k-means). Returns the assignments
    and the centres' snapshot rows to commit (none when the centres did not move)."""
    if models.online is None:
        return None, []
    points = as_points(prepared, PREPARED_VECTOR, "user_id")
    centres: list[CentroidRow] = []
    if models.online_batch is None or models.online_batch < batch_id:
        sums, counts = batch_statistics(prepared, PREPARED_VECTOR, models.online.centers)
        models.online.update(sums, counts)
        models.online_batch = batch_id
        now = dt.datetime.now(dt.UTC)
        centres = [
            CentroidRow(app_id=cfg.streaming.app_id, batch_id=batch_id, model=ONLINE_BASE, segment=models.kmeans_ids[j],
                        centroid=[float(x) for x in models.online.centers[j]],
                        weight=float(models.online.weights[j]), processed_at=now)
            for j in range(models.online.k)
        ]
    cluster, squared = nearest_centre(POINT, models.online.centers)
    ids, names = memoised(models, "online_maps", lambda: tuple(
        F.create_map(*[F.lit(x) for pair in sorted(mapping.items()) for x in pair])
        for mapping in (models.kmeans_ids, models.kmeans_names)))
    segment = ids[cluster]
    return points.select(
        "user_id",
        segment.cast("int").alias("segment"),
        F.coalesce(names[segment], F.lit("unnamed segment")).alias("segment_name"),
        F.lit(None).cast("double").alias("probability"),
        F.sqrt(squared).alias("anomaly_score"),  # distance to the online centre, prepared units
        F.lit(None).cast("boolean").alias("is_anomaly"),
    ), centres


def _model_scores(assignments: dict[str, DataFrame]) -> DataFrame:
    """One row per user and model: user_id, model, segment (stable), segment_name, probability,
    anomaly_score, is_anomaly."""
    rows = None
    for model, frame in assignments.items():
        part = frame.select(
            F.col("user_id").cast("string").alias("user_id"), F.lit(model).alias("model"),
            F.col("segment").cast("int").alias("segment"), "segment_name",
            F.col("probability").cast("double").alias("probability"),
            F.col("anomaly_score").cast("double").alias("anomaly_score"),
            F.col("is_anomaly").cast("boolean").alias("is_anomaly"),
        )
        rows = part if rows is None else rows.unionByName(part)
    return rows


def _live_rows(scores: DataFrame, as_of: dt.date, app: str, batch_id: int) -> DataFrame:
    stamped = scores.select(
        *[c for c in USER_SEGMENTS_LIVE.names if c in ("user_id", "model", "segment", "segment_name", "probability",
                                                       "anomaly_score", "latest_event_time")],
        F.lit(as_of).cast("date").alias("as_of"), F.lit(app).alias("app_id"), F.lit(batch_id).cast("long").alias("batch_id"),
        F.current_timestamp().alias("processed_at"),
    )
    return stamped.select(*[F.col(f.name).cast(f.dataType) for f in USER_SEGMENTS_LIVE.fields])


def _emerging(spark, cfg: Config, models: StreamModels, assignments: dict[str, DataFrame], outputs: dict[str, DataFrame],
              prepared: DataFrame, features: DataFrame, batch_id: int, as_of: dt.date) -> emerging.Finding | None:
    """The emerging-segment check (streaming.emerging) on the batch's bundle scores; the live
    assignments are already written and stay as they are."""
    if models.population is None:
        return None
    return emerging.detect(
        spark, cfg, batch_id=batch_id, as_of=as_of, assignments=assignments,
        embeddings=outputs.get("user_embeddings"), prepared=prepared,
        features=features, feature_names=list(models.population.means), population=models.population,
        thresholds=models.outlier_thresholds, reference=models.training_embeddings,
        category_labels=models.category_labels, window=models.outlier_window,
        commit_metadata=models.commit_metadata(cfg.streaming.app_id),
    )


def _drift(spark, cfg: Config, models: StreamModels, features: DataFrame, scores: DataFrame, batch_id: int,
           report: BatchReport, finding: emerging.Finding | None = None) -> None:
    thresholds = drift.DriftThresholds(
        psi=cfg.streaming.drift.psi, centroid_shift=cfg.streaming.drift.centroid_shift,
        size_change=cfg.streaming.drift.size_change, noise_share=cfg.streaming.drift.noise_share,
    )
    psi = drift.feature_psi(models.reference, features)
    counts: dict[str, dict[int, int]] = {}
    for row in scores.groupBy("model", "segment").count().collect():
        counts.setdefault(row.model, {})[int(row.segment)] = int(row["count"])
    now, rows, reasons = dt.datetime.now(dt.UTC), [], []
    for model, by_segment in sorted(counts.items()):
        users = sum(by_segment.values())
        trained = models.trained_shares.get(ONLINE_BASE if model == ONLINE_MODEL else model, {})
        shifts = None
        if model == ONLINE_MODEL and models.trained_centres is not None:
            shifts = drift.centroid_shift(models.trained_centres, models.online.centers)
        noise = by_segment.get(NOISE_SEGMENT, 0) / users if model in NOISE_MODELS else None
        verdict = drift.assess(thresholds, psi_by_feature=psi, shifts=shifts,
                               size_changes=drift.size_change(trained, by_segment), noise_share=noise)
        # The candidates come from the users the outlier models fit badly: their rows name them.
        candidates = finding.reasons if finding is not None and model in finding.models else []
        rows.append(DriftRow(
            app_id=cfg.streaming.app_id, batch_id=batch_id, as_of=report.as_of, model=model, users=users,
            max_psi=verdict["max_psi"], psi=json.dumps(verdict["psi"], sort_keys=True),
            max_centroid_shift=verdict["max_centroid_shift"], max_size_change=verdict["max_size_change"],
            noise_share=noise, retrain_recommended=verdict["retrain_recommended"] or bool(candidates),
            reasons=verdict["reasons"] + candidates, processed_at=now,
        ))
        # The features' PSI is the batch's, the same for every model: said once, not per model; so
        # are the emerging candidates (below).
        reasons += [reason if reason.startswith("PSI") else f"{model}: {reason}" for reason in verdict["reasons"]]
    if finding is not None:
        reasons += finding.reasons
    reasons = list(dict.fromkeys(reasons))
    report.users = max((sum(c.values()) for c in counts.values()), default=0)
    report.retrain_recommended, report.reasons = bool(reasons), reasons
    if reasons:
        log.warning("stream batch %d: retrain recommended: %s", batch_id, "; ".join(reasons))
    write_rows(spark, cfg.output, DRIFT, rows, txn=(TABLES[DRIFT].txn_app(cfg.streaming.app_id), batch_id),
               commit_metadata=models.commit_metadata(cfg.streaming.app_id))


def _write_batch_row(spark, cfg: Config, report: BatchReport, models: StreamModels) -> None:
    row = StreamBatchRow(
        app_id=cfg.streaming.app_id, batch_id=report.batch_id, as_of=report.as_of, input_rows=report.input_rows,
        clean_rows=report.clean_rows, quarantined_rows=report.quarantined_rows, users=report.users,
        retrain_recommended=report.retrain_recommended, reasons=report.reasons, seconds=round(report.seconds, 3),
        step_seconds=json.dumps(report.step_seconds, sort_keys=True), processed_at=dt.datetime.now(dt.UTC),
        query_id=models.query_id,
    )
    write_rows(spark, cfg.output, BATCHES, [row], txn=(TABLES[BATCHES].txn_app(cfg.streaming.app_id), report.batch_id),
               commit_metadata=models.commit_metadata(cfg.streaming.app_id))


@dataclass
class StreamRun:
    run_id: str
    bundle: str
    reports: list[BatchReport] = field(default_factory=list)

    def summary(self) -> dict:
        done = [r for r in self.reports if not r.skipped]
        flagged = [r for r in done if r.retrain_recommended]
        return {
            "bundle": self.bundle, "batches": len(done), "replayed_batches": len(self.reports) - len(done),
            "input_rows": sum(r.input_rows for r in done), "clean_rows": sum(r.clean_rows for r in done),
            "quarantined_rows": sum(r.quarantined_rows for r in done), "users_assigned": sum(r.users for r in done),
            "as_of": str(max((r.as_of for r in done if r.as_of), default=None)),
            "retrain_recommended": bool(flagged), "retrain_reasons": flagged[-1].reasons if flagged else [],
        }


def run_stream(spark: SparkSession, cfg: Config, *, available_now: bool = False, bundle: str | None = None,
               run_id: str | None = None, on_batch=None) -> StreamRun:
    """Start the stream and wait for it (until stopped, or until the input is processed with
    available_now). Every batch updates the stream's `runs` row (status running, then succeeded)."""
    apply_required_conf(spark)
    if uses_catalog(cfg.output):
        # Exactly-once rests on reading each table's Delta transactions (delta-rs, by path) before a
        # batch writes; catalog names would need the metastore's storage location for that.
        raise ConfigError(
            "segspark stream writes path tables under output.root: leave output.catalog and output.schema "
            "empty for the stream (the batch commands write catalog tables)"
        )
    # The pseudonym key is read once, before the stream starts (a missing key is exit 2).
    protection = resolve_protection(cfg.privacy, spark)
    app, checkpoint_path = cfg.streaming.app_id, cfg.streaming.checkpoint_path(cfg.output)
    with identity.StreamLock(cfg.output.root, app).acquire(checkpoint=checkpoint_path) as lock:
        checkpoint, commits = check_stream_identity(cfg)
        _check_no_batch_run_in_namespace(spark, cfg)
        bundle = bundle or cfg.streaming.bundle or latest_bundle(spark, cfg)
        models = load_stream_models(spark, cfg, bundle, last_batch=checkpoint.last_batch)
        check_same_pseudonyms(models.loaded.manifest.training_data.get("privacy"), protection.describe(), bundle)
        started_at = dt.datetime.now(dt.UTC)
        run = StreamRun(run_id or f"{app}-{started_at:%Y%m%dT%H%M%S}", bundle)
        log.info("stream %s: app %s, bundle %s (training run %s), models %s", run.run_id, app, bundle,
                 models.loaded.manifest.run_id, ", ".join(models.loaded.manifest.models))
        # The query's id is known only once it has started: no batch may write before it is checked.
        checked, refusal = threading.Event(), []

        def each(records: DataFrame, batch_id: int) -> None:
            checked.wait()
            if refusal:
                raise identity.StreamRefused(refusal[0])
            report = process_batch(spark, cfg, models, records, batch_id, protection)
            run.reports.append(report)
            _record_stream_run(spark, cfg, run, started_at, "running")
            if on_batch is not None:
                on_batch(report)

        # input.format mqtt: messages land in input.path (durably, then acknowledged) before the query
        # reads them; a landing failure stops the query. Other formats: no landing.
        queries = []
        with mqtt_landing.landing_for_stream(cfg.input, app, available_now=available_now,
                                             on_error=lambda exc: [q.stop() for q in queries]) as landing:
            query = start_stream(spark, cfg, each, available_now=available_now)
            queries.append(query)
            try:
                identity.confirm_query(app, cfg.output.root, checkpoint, commits, str(query.id))
                models.query_id = str(query.id)
                lock.update(query_id=models.query_id)
                log.info("stream %s: query %s of checkpoint %s", run.run_id, models.query_id, checkpoint_path)
            except BaseException as exc:
                refusal.append(str(exc) or type(exc).__name__)
                checked.set()
                query.stop()
                raise
            checked.set()
            try:
                query.awaitTermination()
                if landing is not None and landing.error is not None:
                    raise RuntimeError(f"mqtt landing failed: {landing.error}") from landing.error
            except BaseException:
                _record_stream_run(spark, cfg, run, started_at, "failed")
                raise
        _record_stream_run(spark, cfg, run, started_at, "succeeded")
    return run


def _check_no_batch_run_in_namespace(spark: SparkSession, cfg: Config) -> None:
    """Refuse an app_id whose batch rows would replace a batch run's: the stream writes each batch's
    rows under `<app_id>-<batch id>`, and a batch run may have taken such an id before this app_id
    was configured (batch runs refuse ids in the namespace of the app_id configured at their time)."""
    app = cfg.streaming.app_id
    if not output_table_exists(spark, cfg.output, "runs"):
        return
    taken = (
        read_output_table(spark, cfg.output, "runs")
        .where(F.col("run_id").rlike(f"^{re.escape(app)}-[0-9]+$"))
        .select("run_id").limit(3).collect()
    )
    if taken:
        raise identity.StreamRefused(
            f"streaming.app_id {app!r}: the runs table holds batch run(s) {', '.join(r.run_id for r in taken)}, and "
            f"this stream would write its batches' rows under the same ids (<app_id>-<batch id>). Choose another "
            "streaming.app_id"
        )


def check_stream_identity(cfg: Config) -> tuple[identity.CheckpointState, list[identity.TableCommits]]:
    """Refuse (identity.StreamRefused) a checkpoint that does not own the app's commits in the tables
    (a reset checkpoint, another stream's); returns what the check read, for `confirm_query`. Needs no
    Spark: the CLI runs it before the session starts, and `run_stream` again under the lock."""
    app = cfg.streaming.app_id
    checkpoint = identity.read_checkpoint(cfg.streaming.checkpoint_path(cfg.output))
    tables = {table_path(cfg.output, table): table.txn_app(app) for table in stream_tables()}
    commits = identity.committed_batches(tables, app)
    identity.check_identity(app, cfg.output.root, checkpoint, commits)
    return checkpoint, commits


def _record_stream_run(spark, cfg: Config, run: StreamRun, started_at: dt.datetime, status: str) -> None:
    summary = run.summary()
    as_of = max((r.as_of for r in run.reports if r.as_of), default=None)
    row = RunRow(
        run_id=run.run_id, started_at=started_at, finished_at=dt.datetime.now(dt.UTC), status=status,
        config_hash=cfg.config_hash(), as_of=as_of, input_rows=summary["input_rows"], clean_rows=summary["clean_rows"],
        quarantined_rows=summary["quarantined_rows"], users=summary["users_assigned"],
        metrics=json.dumps({"stream": summary, "app_id": cfg.streaming.app_id}, sort_keys=True, default=str),
    )
    write_rows(spark, cfg.output, "runs", [row], run.run_id)


__all__ = ["BatchReport", "StreamModels", "StreamRun", "check_stream_identity", "latest_bundle", "load_stream_models",
           "process_batch", "run_stream"]
