"""Emerging segments in the stream: models trained on the generator's six clean personas, then a
stream that brings the training users back plus users of a seventh persona the training never saw
(`personas="emerging"`). The new users are proposed as one candidate segment (table, size, profile,
name, retrain reason) while every live segment id stays the bundle's."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from deltalake import DeltaTable

from segspark import usecases
from segspark.config import load_config
from segspark.datagen import GenerateSpec, generate_block
from segspark.streaming import job

from .conftest import FAST_MODELS, REPO

PLANTED = 60
FIRST_NEW_ID = 100_001
# k-means and the deep model only (the two outlier models; the others would add minutes), k fixed at
# the clean set's six personas: no k sweep.
MODELS = (*FAST_MODELS, "models.bisecting_kmeans.enabled=false", "models.gmm.enabled=false", "models.kmeans.k=6")


def _events(spec: GenerateSpec) -> pd.DataFrame:
    """The generator's events for `spec`, built in this process (no Spark job: the fixture's time goes
    to training and streaming)."""
    return pd.concat([generate_block(spec, block) for block in range(spec.blocks)], ignore_index=True)


def _table(root: Path, name: str):
    return DeltaTable(str(root / "out" / name)).to_pandas()


@pytest.fixture(scope="module")
def streamed(spark, tmp_path_factory):
    """Train on 300 clean users; then one stream run over two landing files: half of the training
    users (batch 0), then the other half with PLANTED users of the new persona (batch 1)."""
    root = tmp_path_factory.mktemp("emerging")
    old = _events(GenerateSpec(users=300, days=30, seed=5))
    new = _events(GenerateSpec(users=PLANTED, days=30, seed=9, personas="emerging", first_user_id=FIRST_NEW_ID))
    (root / "train").mkdir()
    old.to_parquet(root / "train/events.parquet", index=False)
    cfg = load_config(REPO / "conf/local.yaml", [f"input.path={root}/train", f"output.root={root}/out", *MODELS])
    usecases.run(spark, cfg, run_id="train-1")

    landing = root / "landing"
    landing.mkdir()
    old[old.user_id % 2 == 0].to_parquet(landing / "a.parquet", index=False)
    pd.concat([old[old.user_id % 2 == 1], new]).to_parquet(landing / "b.parquet", index=False)
    # Files are taken oldest first (one per batch): a.parquet is made the older one.
    os.utime(landing / "a.parquet", (1_700_000_000, 1_700_000_000))
    stream_cfg = load_config(REPO / "conf/local.yaml", [
        f"input.path={landing}", f"output.root={root}/out", *MODELS, "streaming.state_buckets=2",
        "streaming.max_files_per_trigger=1", "streaming.drift.emerging.outlier_share=0.1",
    ])
    reports = job.run_stream(spark, stream_cfg, available_now=True).reports
    assert [r.batch_id for r in reports] == [0, 1]
    return root, reports[0], reports[1]


def test_the_new_persona_is_proposed_as_one_candidate(streamed):
    root, before, after = streamed
    candidates = _table(root, "candidate_segments")
    assert set(candidates.batch_id) == {1}, candidates  # batch 0 (training users only) proposes nothing
    assert len(candidates) == 1, candidates[["candidate", "segment_name", "size"]]
    found = candidates.iloc[0]
    # Its users are planted ones, most of them (the rest sit nearer a known segment's users, or are
    # HDBSCAN noise); no training user was taken for one.
    members = {int(u) for u in found.user_ids}
    assert len(members) == found["size"] and members <= set(range(FIRST_NEW_ID, FIRST_NEW_ID + PLANTED))
    assert 0.7 * PLANTED <= found["size"] <= PLANTED, found["size"]
    assert found.training_members <= 0.1 * found["size"]
    assert found.window_users == 300 + PLANTED and found.space == "autoencoder embeddings"

    # Its profile is the planted behaviour: premium, several items per order, in the small hours.
    means, zscores = dict(found.feature_means), dict(found.feature_zscores)
    profiles = _table(root, "segment_profiles")
    trained = profiles[profiles.run_id == "train-1"]
    richest = max(dict(m)["monetary"] for m in trained.feature_means)
    assert means["monetary"] > 2 * richest, (means["monetary"], richest)
    assert means["night_share"] > 0.6 and zscores["night_share"] >= 0.5 and zscores["monetary"] >= 0.5
    assert "high-value" in found.segment_name and "night-time" in found.segment_name, found.segment_name
    assert found.segment_name not in set(trained.segment_name)

    # The reason names it, in the batch row and in the outlier models' drift rows.
    reason = f"emerging segment candidate '{found.segment_name}' ({found['size']} users)"
    assert reason in after.reasons and after.retrain_recommended
    assert not any("emerging" in r for r in before.reasons)
    batches = _table(root, "stream_batches").set_index("batch_id")
    assert reason in list(batches.loc[1, "reasons"])
    drift = _table(root, "segment_drift")
    flagged = drift[(drift.batch_id == 1) & drift.model.isin(["kmeans", "ae_hdbscan"])]
    assert len(flagged) == 2 and flagged.retrain_recommended.all()
    assert all(reason in list(r) for r in flagged.reasons)

    # The window behind it: nearly every planted user is an outlier of batch 1, with its embedding.
    outliers = _table(root, "stream_outliers")
    new = outliers[outliers.user_id.astype(int) >= FIRST_NEW_ID]
    assert set(new.batch_id) == {1} and len(new) >= 0.9 * PLANTED
    assert new.embedding.map(len).nunique() == 1


def test_live_segment_ids_do_not_change(streamed):
    root, _, _ = streamed
    live = _table(root, "user_segments_live")
    segments = _table(root, "user_segments")
    trained = segments[segments.run_id == "train-1"]
    batches = _table(root, "stream_batches")
    runs = _table(root, "runs").set_index("run_id")
    # The stream's as-of date is the training run's: the same events give the same features.
    assert set(batches.as_of) == {runs.loc["train-1", "as_of"]}
    for model in ("kmeans", "ae_hdbscan"):
        want = trained[trained.model == model].set_index("user_id").segment
        got = live[(live.model == model) & (live.user_id.astype(int) < FIRST_NEW_ID)].set_index("user_id").segment
        assert len(got) == 300 and got.sort_index().equals(want.loc[got.index].sort_index()), model
        # The planted users get the bundle's segments (or noise): no candidate became a live segment.
        planted = live[(live.model == model) & (live.user_id.astype(int) >= FIRST_NEW_ID)]
        assert len(planted) == PLANTED and set(planted.segment) <= set(want) | {-1}, model


def _window_by_query(spark, cfg, batch_id: int, batch_users: int) -> tuple[int, int, list]:
    """The window as a query of the tables gives it (what every batch ran before the stream kept it
    in memory): (users, outliers, sample rows as (user_id, batch_id, embedding, features))."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from segspark.io.tables import output_table_exists, read_output_table

    settings, app = cfg.streaming.drift.emerging, cfg.streaming.app_id
    inside = (F.col("app_id") == app) & F.col("batch_id").between(batch_id - settings.window_batches + 1, batch_id)
    users = batch_users
    if output_table_exists(spark, cfg.output, "stream_batches"):
        batches = read_output_table(spark, cfg.output, "stream_batches").where(inside & (F.col("batch_id") < batch_id))
        users += int(batches.agg(F.sum("users")).first()[0] or 0)
    rows = read_output_table(spark, cfg.output, "stream_outliers").where(inside)
    latest = Window.partitionBy("user_id").orderBy(F.col("batch_id").desc())
    picked = (rows.withColumn("_n", F.row_number().over(latest)).where(F.col("_n") == 1)
              .orderBy(F.xxhash64("user_id"), "user_id").limit(settings.max_users).collect())
    sample = sorted((r.user_id, r.batch_id, list(r.embedding), dict(r.features)) for r in picked)
    return users, rows.count(), sample


def test_the_window_kept_in_memory_is_the_window_of_the_tables(spark, make_config):
    """OutlierWindow, batch by batch and after a restart (loaded from the tables), against a query of
    the whole window: the same counts, and the same sampled users with their latest rows, where
    users come back in later batches and the window holds more outliers than max_users."""
    import datetime as dt

    import numpy as np
    from pyspark.sql.types import ArrayType, DoubleType, StructField, StructType

    from segspark.io.catalog import STREAM_OUTLIERS, TABLES, StreamBatchRow
    from segspark.io.tables import write_rows
    from segspark.streaming.emerging import VALUES, OutlierWindow

    cfg = make_config("streaming.app_id=window", "streaming.drift.emerging.window_batches=3",
                      "streaming.drift.emerging.max_users=10")
    settings, names = cfg.streaming.drift.emerging, ["monetary", "night_share"]
    rng = np.random.default_rng(3)
    at = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    window = OutlierWindow(names, settings)
    for batch in range(4):
        flagged = sorted(int(u) for u in rng.choice(40, size=15, replace=False))  # users come back
        records = [
            ("window", batch, dt.date(2026, 3, 1), f"u{u:02d}", ["kmeans"], [float(x) for x in rng.normal(size=3)],
             {"monetary": float(batch * 100 + u), "night_share": None if u % 7 == 0 else 0.5}, at)
            for u in flagged
        ]
        rows = spark.createDataFrame(records, STREAM_OUTLIERS)
        written = write_rows(spark, cfg.output, "stream_outliers", rows,
                             txn=(TABLES["stream_outliers"].txn_app("window"), batch))
        batch_users = 100 + batch
        window.load(spark, cfg, batch)  # the first batch only: nothing before it
        # As a batch's own rows reach it (outlier_rows): the features also as an array in names' order.
        own = spark.createDataFrame([(*r, [r[6][n] for n in names]) for r in records],
                                    StructType([*STREAM_OUTLIERS.fields, StructField(VALUES, ArrayType(DoubleType()))]))
        window.add(batch, batch_users, written.rows, own)
        users, outliers, sample = _window_by_query(spark, cfg, batch, batch_users)
        assert window.counts(batch) == (users, outliers)
        kept = window.sample(batch)
        assert [(o.user_id, o.batch_id, list(o.embedding), o.features) for o in kept] == sample
        assert len(kept) == min(10, len({s[0] for s in sample})) and len(window.batches) <= 3
        write_rows(spark, cfg.output, "stream_batches", [StreamBatchRow(
            "window", batch, None, 0, 0, 0, batch_users, False, [], 0.0, "{}", at, None)],
            txn=(TABLES["stream_batches"].txn_app("window"), batch))
    assert outliers > 10  # the sample was a choice

    # A restart at the last batch (a replay: its outliers are in the table): loaded from the tables,
    # whose features are maps, and given the last batch's rows as the table holds them.
    restarted = OutlierWindow(names, settings)
    restarted.load(spark, cfg, 3)
    assert sorted(restarted.batches) == [1, 2]
    restarted.add(3, batch_users, written.rows, rows)
    assert restarted.counts(3) == window.counts(3)
    assert [(o.user_id, o.batch_id, list(o.embedding), o.features) for o in restarted.sample(3)] == sample

    # Read back beside the stream's start (`preload`), for a checkpoint that planned up to batch 3: the
    # restart's first batch, batch 3 again (a replay) or batch 4, gets the batches a read in it gives;
    # any other batch (not a restart's first) is read in it.
    def kept(loaded):
        return [(n, b.users, b.outliers, [(o.user_id, o.batch_id, list(o.embedding), o.features) for o in b.lowest])
                for n, b in sorted(loaded.batches.items())]

    for first_batch, expected in ((3, [1, 2]), (4, [2, 3]), (1, [0])):
        direct, preloaded = OutlierWindow(names, settings), OutlierWindow(names, settings)
        direct.load(spark, cfg, first_batch)
        preloaded.preload(spark, cfg, 3)
        preloaded.load(spark, cfg, first_batch)
        assert sorted(preloaded.batches) == expected and kept(preloaded) == kept(direct)


def test_the_window_reads_stored_features_by_name_where_their_order_is_not_its_own(spark, make_config):
    """A stored row's features map in the window's order is read as its values; one in another order,
    with a feature missing, or no map at all, is read name by name (missing: NaN)."""
    import math

    from pyspark.sql import functions as F

    from segspark.streaming.emerging import OutlierWindow

    window = OutlierWindow(["a", "b", "c"], make_config().streaming.drift.emerging)
    rows = spark.createDataFrame([
        (1, "u1", [0.1], ["a", "b", "c"], [1.0, 2.0, 3.0]),
        (1, "u2", [0.2], ["c", "a"], [30.0, 10.0]),
        (1, "u3", [0.3], None, None),
    ], "batch_id long, user_id string, embedding array<double>, keys array<string>, values array<double>")
    rows = rows.select("batch_id", "user_id", "embedding", F.map_from_arrays("keys", "values").alias("features"))
    got = {o.user_id: [None if math.isnan(v) else v for v in o.values] for o in window._rows(window._query(rows).toArrow())}
    assert got == {"u1": [1.0, 2.0, 3.0], "u2": [10.0, None, 30.0], "u3": [None, None, None]}


# --- without Spark: the settings and the clustering rule ---------------------------------------------


def test_emerging_settings_are_typed_and_unknown_keys_refused():
    from segspark.errors import ConfigError

    cfg = load_config(REPO / "conf/local.yaml", ["streaming.drift.emerging.window_batches=3"])
    settings = cfg.streaming.drift.emerging
    assert settings.window_batches == 3 and settings.outlier_models == ["ae_hdbscan", "kmeans"]
    for bad, message in (("streaming.drift.emerging.windows=3", "unknown key"),
                         ("streaming.drift.emerging.outlier_models=[kmeans, dbscan]", "unknown model"),
                         ("streaming.drift.emerging.outlier_share=2", "less than or equal to 1"),
                         ("streaming.drift.emerging.min_cluster_size=many", "expected an integer")):
        with pytest.raises(ConfigError, match=message):
            load_config(REPO / "conf/local.yaml", [bad])


def test_a_dense_group_of_outliers_is_a_candidate_and_scattered_ones_are_not():
    """Three known segments (the training users), one new group and scattered outliers: one candidate,
    the group, whatever order the outliers come in."""
    from types import SimpleNamespace

    import numpy as np

    from segspark.config import EmergingConfig
    from segspark.streaming.emerging import Population, find_candidates

    rng = np.random.default_rng(0)
    known = np.vstack([rng.normal(centre, 0.3, (100, 3)) for centre in ((0, 0, 0), (4, 0, 0), (0, 4, 0))])
    group = rng.normal((4, 4, 4), 0.3, (40, 3))
    scattered = rng.uniform(-3, 7, (15, 3))
    sample = [SimpleNamespace(user_id=f"g{i:02d}", embedding=list(v), features={"monetary": 900.0, "night_share": 0.9})
              for i, v in enumerate(group)]
    sample += [SimpleNamespace(user_id=f"s{i:02d}", embedding=list(v), features={"monetary": 50.0, "night_share": 0.1})
               for i, v in enumerate(scattered)]
    population = Population({"monetary": 100.0, "night_share": 0.2}, {"monetary": 50.0, "night_share": 0.2})
    settings = EmergingConfig(min_cluster_size=20, min_samples=5)
    found = find_candidates(sample, settings, population, known)
    assert len(found) == 1 and found[0].training_members == 0
    assert set(found[0].user_ids) <= {s.user_id for s in sample[:40]} and found[0].size >= 35
    assert found[0].means["monetary"] == 900.0 and found[0].zscores["monetary"] == 16.0
    assert "night-time" in found[0].name and found[0].reason == f"emerging segment candidate '{found[0].name}' ({found[0].size} users)"
    shuffled = [sample[i] for i in rng.permutation(len(sample))]
    again = find_candidates(shuffled, settings, population, known)
    assert [(c.name, c.size, c.user_ids) for c in again] == [(c.name, c.size, c.user_ids) for c in found]
    # Outliers alone, all scattered: nothing to propose.
    assert find_candidates(sample[40:] * 2, settings, population, known) == []
