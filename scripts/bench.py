"""Benchmarks: one JSON object per line (format in DESIGN.md), ratios against a baseline measured
in the same process on the same data, because absolute times on shared machines are not stable.

    python scripts/bench.py --suite ingest_features [--scale 10000000 [--scale 50000000 ...]] [--format csv] [--repeat 3]

Suites:
  ingest_features  metric features_vs_plain_aggregation: (ingest + features) time / time of a plain
                   Spark read + groupBy(user) count/max/sum over the same files. "ingest +
                   features" is what the pipeline's stages run: read, type and tag every record,
                   persist the tagged events, count them by reason, the quarantine rows, resolve the
                   slot values and compute the full feature set (written to the noop sink). One line
                   per --scale. --format csv: the same events as CSV in the REES46 layout, read
                   through conf/clickstream.yaml (the baseline reads the same CSV files).
  baselines        metric mllib_kmeans_vs_sklearn: MLlib KMeans fit time / scikit-learn KMeans fit time
                   on the same prepared matrix (the users of --scale events, default 50M -> 1M users;
                   the features are computed once and cached under --work); metric
                   kmeans_sweep_vs_single_fit: choosing k for KMeans as a run does (the user sample,
                   every k and seed fitted and measured on it in Spark tasks, then the full-scale fit
                   of the chosen k from the sample's centroids) / one MLlib KMeans fit (k=6, from
                   k-means||); metric segments_stage_vs_single_fit: the whole segments stage of a
                   training run (every model: the sweep, the full-scale fits, the autoencoder and
                   HDBSCAN, stable ids, profiles, the tables written) / the same single fit; metric
                   selection_sample_size (one line per --sample-sizes): the sweep of the three
                   baselines on a user sample of that size / the same single fit, with the k it
                   chooses per model (the figures behind models.selection.sample_size).
  scoring          metric hdbscan_predict_speedup: hdbscan.approximate_predict time / the vectorised
                   prediction's time on the same 100k held-out embeddings and clusterer (labels must
                   agree), ours on every core (hdbscan uses one) and, as one_core_ratio, on one; metric udf_overhead: embedding + HDBSCAN prediction of every user through
                   Spark (mapInArrow, noop sink) / (the same numpy work in one process / Spark cores).
                   Same users as baselines; the autoencoder and HDBSCAN use models.* defaults.
  streaming        `segspark stream` on JSON files of 10k events each (--scale events in all, default
                   200k; a quick training first): stream_events_per_second over the first half of the
                   files processed available-now; file_to_assignment_latency_p50/p95: then a running
                   query (0.25 s trigger), each remaining file dropped atomically and timed until its
                   batch's live assignments are committed (file_to_batch_end_latency_p50/p95: until the
                   batch's last commit; every file's seconds in `each`); last, batch_vs_recompute: the
                   mean micro-batch time of the available-now run / one batch `score` of its events
                   (what each batch would cost without the state).
  stream_state     the feature state against recomputing, as the history grows (--history, default
                   10k 30k 100k 300k 1M events; a quick training on other users first): the history
                   streamed available-now in files of 100k events (stream_events_per_second: the whole
                   run, the query's start included; after_first_batch: from the end of its first batch
                   to the end of its last, the sustained rate; batch_seconds: each batch), then one
                   10k-event micro-batch timed against one batch `score` of every event so far
                   (batch_vs_recompute per history size), break_even_history where the ratio crosses
                   1, and with --plot the curve as a PNG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyspark import StorageLevel  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from segspark import ingest  # noqa: E402
from segspark.config import load_config  # noqa: E402
from segspark.datagen import GenerateSpec, write_dataset  # noqa: E402
from segspark.features import user_features  # noqa: E402
from segspark.io.readers import read_raw_events  # noqa: E402
from segspark.runtime.session import get_spark  # noqa: E402

EVENTS_PER_USER = 50  # the generator's default mix gives about this many events per user


def emit(suite, metric, value, unit, baseline=None, ratio=None, **extra):
    print(json.dumps({"suite": suite, "metric": metric, "value": value, "unit": unit,
                      "baseline": baseline, "ratio": ratio, **extra}), flush=True)


def timed(action, repeat, warmup=True):
    """Median wall time of `repeat` runs (after one warm-up run unless warmup is False)."""
    if warmup:
        action()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def ensure_events(spark, scale: int, work: Path) -> Path:
    users = max(scale // EVENTS_PER_USER, 1)
    target = work / f"events-{users}u"
    if not (target / "events" / "_SUCCESS").exists():
        write_dataset(spark, GenerateSpec(users=users, days=90, seed=7), str(target), "parquet", overwrite=True)
    return target / "events"


def ensure_rees46_csv(spark, events: Path) -> Path:
    """The same events as CSV files in the REES46 layout (conf/clickstream.yaml): a header line,
    `2019-10-01 00:00:00 UTC` timestamps and a category_id column, every value text."""
    target = events.parent / "rees46-csv"
    if not (target / "_SUCCESS").exists():
        c = F.col
        (
            spark.read.parquet(str(events))
            .select(F.concat(c("event_time"), F.lit(" UTC")).alias("event_time"), "event_type", "product_id",
                    F.abs(F.xxhash64("category_code")).alias("category_id"), "category_code", "brand", "price",
                    "user_id", "user_session")
            .write.mode("overwrite").option("header", "true").csv(str(target))
        )
    return target


def suite_ingest_features(spark, args):
    for scale in args.scale or [10_000_000]:
        ingest_features_at(spark, args, scale)


def ingest_features_at(spark, args, scale: int):
    """(ingest + features) / a plain read + groupBy of the same files: Parquet through
    conf/local.yaml, or with --format csv the same events as REES46-layout CSV through
    conf/clickstream.yaml."""
    parquet = ensure_events(spark, scale, Path(args.work))
    events = spark.read.parquet(str(parquet)).count()
    as_of = dt.date.fromisoformat(spark.read.parquet(str(parquet)).agg(F.max("event_time")).collect()[0][0][:10])
    path = ensure_rees46_csv(spark, parquet) if args.format == "csv" else parquet
    config = "conf/clickstream.yaml" if args.format == "csv" else "conf/local.yaml"
    cfg = load_config(REPO / config, [f"input.path={path}"])

    def segspark_features():
        # What a run's ingest, quarantine and features stages compute (written to the noop sink).
        ingested = ingest.ingest_records(read_raw_events(spark, cfg.input), cfg.input)
        ingest.quarantine_rows(ingested.tagged, "bench", str(path)).write.format("noop").mode("overwrite").save()
        user_features(ingested.clean, as_of, cfg.features, keys=ingested.source_keys).write.format("noop").mode("overwrite").save()
        ingested.unpersist()

    def plain_aggregation():
        read = spark.read.option("header", "true").csv(str(path)) if args.format == "csv" else spark.read.parquet(str(path))
        (
            read.groupBy("user_id")
            .agg(F.count(F.lit(1)).alias("n"), F.max("event_time").alias("last"),
                 F.sum(F.col("price").cast("double")).alias("spend"))
            .write.format("noop").mode("overwrite").save()
        )

    baseline = timed(plain_aggregation, args.repeat, args.warmup)
    ours = timed(segspark_features, args.repeat, args.warmup)
    emit("ingest_features", "features_vs_plain_aggregation", round(ours, 3), "s",
         baseline=round(baseline, 3), ratio=round(ours / baseline, 3), events=events, format=args.format,
         config=config,
         repeat=args.repeat, warmup=args.warmup)


def prepared_users(spark, args):
    """(cfg, preparation, prepared DataFrame (persisted), users, numpy matrix) for the users of
    --scale events. The features are computed once by the pipeline (run "bench") and cached under --work."""
    import numpy as np

    from segspark import usecases
    from segspark.features.catalog import feature_columns
    from segspark.io.delta import read_table
    from segspark.models.prepare import fit_preparation
    from segspark.runtime.session import right_sized

    scale = (args.scale or [50_000_000])[0]
    events = ensure_events(spark, scale, Path(args.work))
    root = Path(args.work) / f"features-{events.parent.name}"
    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={events}", f"output.root={root}"])
    if not (root / "user_features" / "_delta_log").exists():
        usecases.features(spark, cfg, run_id="bench")
    features = read_table(spark, str(root / "user_features")).where(F.col("run_id") == "bench")
    users = features.count()
    features = right_sized(features, users, bytes_per_row=16 * len(features.columns))
    prep = fit_preparation(features, feature_columns(cfg.features), cfg.prepare)
    prepared = prep.transform(features).persist(StorageLevel.MEMORY_AND_DISK)
    prepared.count()
    matrix = prepared.select(*prep.selected).toPandas().to_numpy(dtype=np.float64)
    return cfg, prep, prepared, users, matrix


def suite_baselines(spark, args):
    """MLlib KMeans versus scikit-learn KMeans on the same prepared matrix, what choosing k costs
    against one fit, and the whole segments stage against one fit."""
    from pyspark.ml.clustering import KMeans as SparkKMeans
    from sklearn.cluster import KMeans as SkKMeans

    from segspark import usecases
    from segspark.models import kmeans
    from segspark.models.prepare import PREPARED_VECTOR
    from segspark.models.sample import collect_user_sample
    from segspark.segments.train import train_baselines

    cfg, prep, prepared, users, matrix = prepared_users(spark, args)
    k, iterations = 6, 20

    def mllib(frame=None):
        # As models.kmeans fits: on a projection of the cached vectors, so that MLlib caches its own
        # deserialised copy for the iterations (fitting the cached DataFrame itself is measured too).
        frame = prepared.select(PREPARED_VECTOR) if frame is None else frame
        model = SparkKMeans(k=k, maxIter=iterations, tol=0.0, seed=1, featuresCol=PREPARED_VECTOR).fit(frame)
        return model.summary.numIter

    def sklearn():
        return SkKMeans(n_clusters=k, n_init=1, max_iter=iterations, tol=0.0, random_state=1).fit(matrix).n_iter_

    mllib_s = timed(mllib, args.repeat, args.warmup)
    cached_input_s = timed(lambda: mllib(prepared), args.repeat, args.warmup)
    sklearn_s = timed(sklearn, args.repeat, args.warmup)
    emit("baselines", "mllib_kmeans_vs_sklearn", round(mllib_s, 3), "s", baseline=round(sklearn_s, 3),
         ratio=round(mllib_s / sklearn_s, 3), users=users, dims=int(matrix.shape[1]), k=k, max_iter=iterations,
         mllib_iterations=mllib(), sklearn_iterations=int(sklearn()), spark_cores=spark.sparkContext.defaultParallelism,
         mllib_on_cached_dataframe_s=round(cached_input_s, 3))

    selection = cfg.models.selection
    chosen = {}

    def one_fit():
        kmeans.fit_one(prepared, 6, 42, max_iter=cfg.models.kmeans.max_iter, contamination=cfg.models.kmeans.contamination)

    def kmeans_sweep():
        sample = collect_user_sample(prepared, prep.selected, selection.sample_size, users, selection.sample_seed)
        (trained,) = train_baselines(spark, {"kmeans": cfg.models.kmeans}, selection, prepared, sample)
        chosen.update(k=trained.k, sample_users=sample.size)

    single = timed(one_fit, args.repeat, args.warmup)
    swept = timed(kmeans_sweep, args.repeat, args.warmup)
    ks = list(range(selection.k_min, selection.k_max + 1))
    emit("baselines", "kmeans_sweep_vs_single_fit", round(swept, 3), "s", baseline=round(single, 3),
         ratio=round(swept / single, 3), users=users, ks=ks, seeds=selection.seeds, fits=len(ks) * selection.seeds,
         sample_users=chosen["sample_users"], chosen_k=chosen["k"])

    # The sample size: what the sweep of every baseline costs and which k it chooses per size.

    from segspark.evaluation.selection import curve_from_grid
    from segspark.models import registry
    from segspark.models.sample_grid import Cell, run_grid
    from segspark.runtime.session import task_slots

    largest = collect_user_sample(prepared, prep.selected, max(args.sample_sizes), users, selection.sample_seed)
    for size in sorted(args.sample_sizes):
        sample = largest.head(size)
        cells, fitters, options = [], {}, {}
        swept = [m for m in registry.MODELS if m.swept]
        for model in swept:
            name, model_cfg, module = model.name, model.settings(cfg.models), model.implementation()
            fitters[name] = module.fit_sample
            options[name] = module.options(model_cfg, sample.matrix)
            cells += [Cell(name, k, model_cfg.seed + 1009 * i) for k in ks for i in range(selection.seeds)]
        start = time.perf_counter()
        results = run_grid(spark, sample.matrix, cells, fitters, options, selection.silhouette_sample,
                           tasks=2 * (task_slots(spark) or 1))
        seconds = time.perf_counter() - start
        picks = {name: curve_from_grid([r for r in results if r.cell.model == name]).choose(selection.silhouette_tolerance)[0]
                 for name in (m.name for m in swept)}
        emit("baselines", "selection_sample_size", round(seconds, 3), "s", baseline=round(single, 3),
             ratio=round(seconds / single, 3), users=users, sample_users=sample.size, fits=len(cells), chosen_k=picks)

    stage = []

    def segments_stage():
        result = usecases.train(spark, cfg, run_id="bench")
        stage.append(result.stage_seconds)

    timed(segments_stage, 1, False)
    seconds = stage[-1]["segments"]
    emit("baselines", "segments_stage_vs_single_fit", round(seconds, 3), "s", baseline=round(single, 3),
         ratio=round(seconds / single, 3), users=users, models=["kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan"],
         stage_seconds=stage[-1])
    prepared.unpersist()


def suite_scoring(spark, args):
    """The deep path's prediction: vectorised HDBSCAN against hdbscan.approximate_predict, and the
    cost of running embedding + prediction for every user through Spark against plain numpy."""
    import hdbscan
    import numpy as np
    from threadpoolctl import threadpool_limits

    from segspark.models.deep.autoencoder import train_autoencoder
    from segspark.models.deep.density import fit_hdbscan
    from segspark.models.deep.scoring import deep_scores

    cfg, _, prepared, users, matrix = prepared_users(spark, args)
    ae_cfg, hdb_cfg = cfg.models.autoencoder, cfg.models.hdbscan
    rng = np.random.default_rng(7)
    order = rng.permutation(users)
    start = time.perf_counter()
    trained = train_autoencoder(matrix[order[: ae_cfg.sample_size]], ae_cfg)
    train_s = time.perf_counter() - start
    fitted = fit_hdbscan(trained.encoder.encode(matrix[order[: hdb_cfg.sample_size]]), hdb_cfg)
    # Held-out points never in the HDBSCAN sample: a training point's twin gets its fitted values by
    # design (models.density), which hdbscan does not reproduce.
    held_out = trained.encoder.encode(matrix[order[max(hdb_cfg.sample_size, users - 100_000):]]).astype(np.float64)

    def library():
        return hdbscan.approximate_predict(fitted.clusterer, held_out)

    def ours(workers):
        return fitted.artifact.predict(held_out, workers=workers)

    # hdbscan's prediction runs on one core; ours on every core of the machine (value, ratio) and,
    # for comparison at equal resources, on one (one_core_s, one_core_ratio).
    cores = len(os.sched_getaffinity(0))
    (lib_labels, lib_probabilities), lib_s = library(), timed(library, args.repeat, args.warmup)
    labels, probabilities, _ = ours(-1)
    ours_s = timed(lambda: ours(-1), args.repeat, args.warmup)
    one_labels, one_probabilities, _ = ours(1)
    one_core_s = timed(lambda: ours(1), args.repeat, args.warmup)
    agree = float(min(np.mean(labels == lib_labels), np.mean(one_labels == lib_labels)))
    probability_diff = max(np.max(np.abs(probabilities - lib_probabilities)),
                           np.max(np.abs(one_probabilities - lib_probabilities)))
    emit("scoring", "hdbscan_predict_speedup", round(ours_s, 4), "s", baseline=round(lib_s, 3),
         ratio=round(lib_s / ours_s, 2), cores=cores, one_core_s=round(one_core_s, 4),
         one_core_ratio=round(lib_s / one_core_s, 2), points=len(held_out), label_agreement=agree,
         max_probability_diff=float(probability_diff),
         fitted_on=int(fitted.metrics()["sample_rows"]), clusters=int(fitted.metrics()["n_clusters"]),
         autoencoder_train_s=round(train_s, 1), autoencoder_epochs=trained.metrics().get("history", {}).get("epochs_run"))

    encoder, density = trained.encoder, fitted.artifact
    cores = spark.sparkContext.defaultParallelism

    def through_spark():
        deep_scores(prepared, encoder, density).write.format("noop").mode("overwrite").save()

    def numpy_alone():
        # One core, as each Spark task gets: the same 10k-row batches Arrow hands the workers.
        with threadpool_limits(1):
            for start_row in range(0, users, 10_000):
                density.predict(encoder.encode(matrix[start_row : start_row + 10_000]))

    spark_s = timed(through_spark, args.repeat, args.warmup)
    numpy_s = timed(numpy_alone, args.repeat, args.warmup)
    emit("scoring", "udf_overhead", round(spark_s, 3), "s", baseline=round(numpy_s / cores, 3),
         ratio=round(spark_s / (numpy_s / cores), 3), users=users, numpy_one_process_s=round(numpy_s, 3),
         spark_cores=cores)
    prepared.unpersist()


STREAM_TRAINING = (  # a quick training: this suite measures the stream, not the fit
    "models.selection.k_min=4", "models.selection.k_max=4", "models.selection.seeds=1",
    "models.autoencoder.epochs=20", "models.autoencoder.hidden_layers=[32]",
)


def _time_sliced_lines(spark, folder: Path, events: int, seed: int) -> list[str]:
    """`events` generated JSON lines in event-time order: files cut from them are what a landing
    folder receives, each a slice of time with many users' events. The generator's default mix gives
    about 25 events per user in 30 days: a margin, and the count checked."""
    write_dataset(spark, GenerateSpec(users=max(events // 20, 10), days=30, seed=seed), str(folder), "json")
    lines = (line for p in (folder / "events").glob("part-*") for line in p.read_text().splitlines() if line.strip())
    ordered = sorted(lines, key=lambda line: json.loads(line)["event_time"])
    if len(ordered) < events:
        raise SystemExit(f"generated {len(ordered)} events, fewer than the {events} asked for")
    return ordered[:events]


def _trained_stream(spark, work: Path, training_events: Path, **streaming):
    """A quick training run (`bench-train`) on `training_events`, and the config of a stream of one
    file per micro-batch from the empty landing folder `work/landing`: (cfg, stream_cfg, landing)."""
    from segspark import usecases

    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={training_events}", "input.format=json",
                                                 f"output.root={work}/out", *STREAM_TRAINING])
    usecases.run(spark, cfg, run_id="bench-train")
    landing = work / "landing"
    landing.mkdir()
    stream_cfg = cfg.model_copy(update={
        "input": cfg.input.model_copy(update={"path": str(landing)}),
        "streaming": cfg.streaming.model_copy(update={"max_files_per_trigger": 1, **streaming}),
    })
    return cfg, stream_cfg, landing


# The latency part's micro-batch interval: what a stream kept for low latency would set
# (streaming.trigger_seconds). An idle query looks for new files this often, so a file waits up to one
# interval before its batch starts (half of it on average); each look is a listing of the landing
# folder and nothing more. It was 1 s until 2026-12-07 (p95 4.998-5.37 s to the assignments, of which
# up to 1 s was that wait).
LATENCY_TRIGGER_SECONDS = 0.25


def suite_streaming(spark, args):
    """Events/s and file-to-assignment latency of `segspark stream` at about 10k events per batch."""
    import shutil
    import threading

    from segspark import usecases
    from segspark.streaming import job

    scale = (args.scale or [200_000])[0]
    work = Path(args.work) / f"stream-{scale}"
    shutil.rmtree(work, ignore_errors=True)
    lines = _time_sliced_lines(spark, work / "data", scale, seed=3)
    per_file = 10_000
    files = [lines[i:i + per_file] for i in range(0, len(lines), per_file)]
    cfg, stream_cfg, landing = _trained_stream(spark, work, work / "data/events", trigger_seconds=LATENCY_TRIGGER_SECONDS)
    half = len(files) // 2

    # Sustained throughput: the first half of the files dropped at once, processed available-now. The
    # same files also go to a folder of their own, for the batch `score` they are compared with.
    so_far = work / "so-far"
    so_far.mkdir()
    for i, chunk in enumerate(files[:half]):
        for folder in (landing, so_far):
            (folder / f"f{i:04d}.json").write_text("\n".join(chunk) + "\n")
    start = time.perf_counter()
    run = job.run_stream(spark, stream_cfg, available_now=True)
    seconds = time.perf_counter() - start
    events = sum(r.clean_rows for r in run.reports)
    emit("streaming", "stream_events_per_second", round(events / seconds, 1), "events/s",
         batches=len(run.reports), events=events, seconds=round(seconds, 2))

    # Latency: a running query (LATENCY_TRIGGER_SECONDS); each file is dropped, then timed to the commit of its
    # batch's live assignments (what users see; the later commits of the batch do not change them),
    # and to the end of its batch.
    committed: dict[int, tuple[float, float]] = {}
    done = threading.Condition()

    def on_batch(report):
        with done:
            finished = time.time()
            committed[report.batch_id] = (report.assigned_at or finished, finished)
            done.notify_all()

    latencies, to_end = [], []
    runner = threading.Thread(target=lambda: job.run_stream(spark, stream_cfg, on_batch=on_batch), daemon=True)
    runner.start()
    time.sleep(5)
    for i, chunk in enumerate(files[half:]):
        seen = len(committed)
        path = landing / f"g{i:04d}.json"
        tmp = landing / f".g{i:04d}.json.tmp"
        tmp.write_text("\n".join(chunk) + "\n")
        dropped = time.time()
        tmp.rename(path)  # atomic: the source never sees half a file
        with done:
            done.wait_for(lambda seen=seen: len(committed) > seen, timeout=600)
        assigned, finished = committed[max(committed)]
        latencies.append(assigned - dropped)
        to_end.append(finished - dropped)
    for query in spark.streams.active:
        query.stop()
    runner.join(timeout=120)

    def p95(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    emit("streaming", "file_to_assignment_latency_p50", round(statistics.median(latencies), 3), "s",
         files=len(latencies), events_per_file=per_file, note="file dropped -> its live assignments committed")
    emit("streaming", "file_to_assignment_latency_p95", round(p95(latencies), 3), "s", files=len(latencies),
         trigger_seconds=LATENCY_TRIGGER_SECONDS, each=[round(x, 2) for x in latencies])
    emit("streaming", "file_to_batch_end_latency_p50", round(statistics.median(to_end), 3), "s", files=len(to_end),
         note="file dropped -> every commit of its batch (state, centres, emerging, drift, batch row)")
    emit("streaming", "file_to_batch_end_latency_p95", round(p95(to_end), 3), "s", files=len(to_end),
         each=[round(x, 2) for x in to_end])

    # Baseline: what one batch costs without the state: features from ALL events of the available-now
    # run + scoring. Measured last: in the same JVM, a batch score of every event just before the running
    # query made that query's first batch slower (its file 4.5 s against 3.1-3.8 at 100k events of
    # history, 8.1 s against 3.2-4.9 at 200k, 2026-12-07): not what a stream on a driver of its own sees.
    recompute_cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"path": str(so_far)}),
                                           "output": cfg.output.model_copy(update={"root": str(work / "recompute")})})
    recompute = timed(lambda: usecases.score(spark, recompute_cfg, bundle=run.bundle), 1, warmup=False)
    per_batch = seconds / max(len(run.reports), 1)
    emit("streaming", "batch_vs_recompute", round(per_batch, 3), "s", baseline=round(recompute, 3),
         ratio=round(per_batch / recompute, 3), note="mean micro-batch time (available-now) / one batch score of "
         "the same events")


def suite_stream_state(spark, args):
    """batch_vs_recompute as the stream's history grows (a restarted stream's first batch, and where the
    history spans batches also the running stream's last: running_batch_vs_recompute), where it crosses
    1, and a PNG of the curve."""
    import shutil

    from segspark import usecases
    from segspark.streaming import job

    points = sorted(args.history or [10_000, 30_000, 100_000, 300_000, 1_000_000])
    per_batch, per_file = 10_000, 100_000
    work = Path(args.work) / "stream-state"
    shutil.rmtree(work, ignore_errors=True)
    total = points[-1] + per_batch * len(points)
    lines = _time_sliced_lines(spark, work / "data", total, seed=5)
    # A quick training on other users of the same shop: the suite measures the stream, not the fit.
    write_dataset(spark, GenerateSpec(users=2_000, days=30, seed=6), str(work / "train"), "json")
    cfg, stream_cfg, landing = _trained_stream(spark, work, work / "train/events")

    def land(chunk: list[str], name: str) -> None:
        tmp = landing / f".{name}.tmp"
        tmp.write_text("\n".join(chunk) + "\n")
        tmp.rename(landing / name)  # atomic: the source never sees half a file

    cursor, curve = 0, []
    for history in points:
        # The history up to `history` events, in files (micro-batches) of up to 100k events. Where it
        # spans more than one batch, its last 10k events are a file of their own: the running
        # stream's last batch, a 10k-event batch of a stream that is already up (`running`).
        files, running_from = 0, history - per_batch if history - cursor > per_batch else None
        while cursor < history:
            end = min(history, cursor + per_file)
            if running_from is not None and cursor < running_from < end:
                end = running_from
            land(lines[cursor:end], f"h{cursor:09d}.json")
            cursor, files = end, files + 1
        running = None
        if files:
            ended: list[float] = []  # when each batch was done, as the stream reports it
            start = time.perf_counter()
            run = job.run_stream(spark, stream_cfg, available_now=True,
                                 on_batch=lambda report, ended=ended: ended.append(time.perf_counter()))
            seconds = time.perf_counter() - start
            reports = list(run.reports)
            if running_from is not None and len(reports) > 1:
                running = reports.pop()  # not in the throughput: its batches are the 100k-event files
                seconds -= running.seconds
                ended.pop()
            events = sum(r.clean_rows for r in reports)
            # Sustained: from the end of the first batch (the query's start, the bundle's load and the
            # first, cold batch before it) to the end of the last, every batch between included.
            steady = (sum(r.clean_rows for r in reports[1:]) / (ended[-1] - ended[0])) if len(reports) > 1 else None
            emit("stream_state", "stream_events_per_second", round(events / seconds, 1), "events/s",
                 batches=len(reports), events=events, seconds=round(seconds, 2),
                 largest_batch=max(r.clean_rows for r in reports), history=history,
                 after_first_batch=round(steady, 1) if steady else None,
                 batch_seconds=[round(r.seconds, 2) for r in reports],
                 note="every batch of the run, the query's start included; after_first_batch: events/s "
                      "from the end of the first batch to the end of the last")
        # One micro-batch of 10k events on top of that history, in a stream started for it (an
        # available-now run's first batch: the bundle is loaded and its scoring built before it, the
        # emerging window read back beside that; the state merge's expressions are built in it), against
        # recomputing everything.
        land(lines[cursor:cursor + per_batch], f"b{cursor:09d}.json")
        cursor += per_batch
        (report,) = job.run_stream(spark, stream_cfg, available_now=True).reports
        recompute_cfg = cfg.model_copy(update={
            "input": cfg.input.model_copy(update={"path": str(landing)}),
            "output": cfg.output.model_copy(update={"root": str(work / f"recompute-{history}")}),
        })
        recompute = timed(lambda cfg=recompute_cfg: usecases.score(spark, cfg, bundle=str(work / "out/_models/bench-train")),
                          1, warmup=False)
        shutil.rmtree(work / f"recompute-{history}", ignore_errors=True)
        ratio = report.seconds / recompute
        curve.append((history, report.seconds, recompute))
        emit("stream_state", "batch_vs_recompute", round(report.seconds, 3), "s", baseline=round(recompute, 3),
             ratio=round(ratio, 3), history=history, batch_events=report.clean_rows,
             step_seconds=report.step_seconds, state_compacted=report.state_compacted,
             note="one 10k-event micro-batch, the first of a restarted stream / one batch score of every event so far")
        if running is not None:
            emit("stream_state", "running_batch_vs_recompute", round(running.seconds, 3), "s",
                 baseline=round(recompute, 3), ratio=round(running.seconds / recompute, 3),
                 history=history - running.clean_rows, batch_events=running.clean_rows,
                 step_seconds=running.step_seconds, state_compacted=running.state_compacted,
                 note="the running stream's last batch, 10k events after the 100k-event ones / the same batch score")
    crossing = _break_even(curve)
    emit("stream_state", "break_even_history", crossing, "events",
         note="history (events) where the micro-batch starts to cost less than recomputing (log-linear "
              "interpolation between measured points); null: not within the points measured")
    if args.plot:
        _plot_stream_state(curve, crossing, Path(args.plot))


def _break_even(curve: list[tuple[int, float, float]]) -> int | None:
    for (h0, b0, r0), (h1, b1, r1) in zip(curve, curve[1:], strict=False):
        q0, q1 = b0 / r0, b1 / r1
        if q0 >= 1 > q1:
            t = (math.log(q0)) / (math.log(q0) - math.log(q1))  # ln(ratio) linear in ln(history)
            return round(math.exp(math.log(h0) + t * (math.log(h1) - math.log(h0))))
    return None


def _plot_stream_state(curve, crossing, out: Path) -> None:
    from matplotlib.figure import Figure

    history = [h for h, _, _ in curve]
    figure = Figure(figsize=(7, 4.2), dpi=120)
    axes = figure.add_subplot()
    axes.plot(history, [b for _, b, _ in curve], "o-", label="one 10k-event micro-batch (feature state)")
    axes.plot(history, [r for _, _, r in curve], "s-", label="recompute: batch score of every event so far")
    axes.set_xscale("log")
    axes.set_xlabel("events in the stream's history")
    axes.set_ylabel("seconds")
    if crossing is not None:
        axes.axvline(crossing, color="grey", linestyle=":", label=f"break-even at about {crossing:,} events")
    axes.set_title("segspark stream: a micro-batch against recomputing (local[2], 2 cores)")
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    print(f"plot: {out}", flush=True)


SUITES = {"ingest_features": suite_ingest_features, "baselines": suite_baselines, "scoring": suite_scoring,
          "streaming": suite_streaming, "stream_state": suite_stream_state}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--sample-sizes", type=int, nargs="*", default=[10_000, 25_000, 50_000, 100_000],
                        help="baselines: user sample sizes whose sweep is timed (and its chosen k reported)")
    parser.add_argument("--scale", type=int, action="append",
                        help="number of events (about; default 10M); repeat for several scales")
    parser.add_argument("--history", type=int, nargs="*",
                        help="stream_state: the history sizes (events) at which a micro-batch is timed")
    parser.add_argument("--plot", help="stream_state: write the curve as a PNG here (e.g. docs/stream_state.png)")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet",
                        help="ingest_features: the generated events as Parquet (conf/local.yaml) or as CSV in the "
                             "REES46 layout (conf/clickstream.yaml)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the warm-up run (for large scales, where one run is minutes)")
    parser.add_argument("--work", default=str(REPO / "bench-out"), help="where generated data is cached")
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("segspark.streaming.job").setLevel(logging.INFO)
    spark = get_spark("segspark-bench", args.master, {"spark.driver.memory": "10g", "spark.sql.shuffle.partitions": "16"})
    try:
        SUITES[args.suite](spark, args)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
