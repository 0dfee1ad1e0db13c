"""The report's sections, each built from the run's tables (via `data`) into page blocks.

A figure that cannot be drawn (a model the run did not train, no previous run, no stream) is
replaced by a note saying why, and recorded in `ReportContext.skipped`: the report never shows
made-up data.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
from pyspark.sql import SparkSession

from segspark.config import OutputConfig
from segspark.io.tracking import flatten
from segspark.report import data, figures
from segspark.report.html import FigureBlock, Note, Paragraph, Section, Table
from segspark.report.projection import project
from segspark.runtime.redaction import redact_text

log = logging.getLogger(__name__)

PROJECTION_USERS = 3000
MEMBERSHIP_BINS = 20
ANOMALY_BINS = 30
STAGE_ORDER = ("ingest", "quarantine", "features", "prepare", "segments", "score", "bundle")


@dataclass(frozen=True)
class Skipped:
    """A figure or section the report left out, and why (the page shows the same reason)."""

    id: str  # the figure (fig-...) or section (sec-...) id, or model-<name> for a model not in the run
    reason: str


@dataclass
class ReportContext:
    spark: SparkSession
    output: OutputConfig
    run: data.RunRecord
    config_hash: str  # of the config the report was made with (compared with the run's)
    profiles: pd.DataFrame
    selection: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    # The config the report was made with, already redacted (Config.redacted): shown as a table.
    settings: dict = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Models with segment profiles in this run, in pipeline order."""
        return list(dict.fromkeys(self.profiles["model"]))

    def skip(self, id_: str, reason: str) -> Note:
        log.info("report: %s left out: %s", id_, reason)
        self.skipped.append(Skipped(id_, reason))
        return Note(reason)

    def model_profiles(self, model: str) -> pd.DataFrame:
        return self.profiles[self.profiles["model"] == model]

    def chosen(self, model: str) -> tuple[int | None, str]:
        """(k, reason) of a model: its chosen model_selection row, else what runs.metrics recorded."""
        rows = self.selection[(self.selection["model"] == model) & self.selection["chosen"].astype(bool)]
        if len(rows):
            return int(rows["k"].iloc[0]), str(rows["reason"].iloc[0] or "")
        metrics = self.run.model_metrics(model)
        k = metrics.get("k")
        return (int(k) if k is not None else None), str(metrics.get("reason") or "")


def figure(id_: str, caption: str, alt: str, draw: Callable, *args, **kwargs) -> FigureBlock:
    return FigureBlock(id=id_, png=figures.png(draw, *args, **kwargs), caption=caption, alt=alt)


# -- formatting ---------------------------------------------------------------------------------


def count(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{int(value):,}"


def number(value, digits: int = 4) -> str:
    if value is None or pd.isna(value):
        return "—"
    return f"{float(value):.{digits}g}"


def when(value) -> str:
    if value is None or pd.isna(value):
        return "—"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if value.tzinfo else "")
    return str(value)


def segment_text(segment, name) -> str:
    return f"{segment} · {name}" if name else str(segment)


# -- sections -----------------------------------------------------------------------------------


def run_section(ctx: ReportContext) -> Section:
    run, metrics = ctx.run, ctx.run.metrics
    duration = (
        f"{(run.finished_at - run.started_at).total_seconds():,.1f} s" if run.started_at and run.finished_at else "—"
    )
    same = "the same as the config this report was made with" if ctx.config_hash == run.config_hash else (
        f"differs from the config this report was made with ({ctx.config_hash[:12]}…)"
    )
    events = metrics.get("event_range") or {}
    facts = [
        ("run id", run.run_id),
        ("status", run.status),
        ("as of", when(run.as_of)),
        ("started", when(run.started_at)),
        ("finished", when(run.finished_at)),
        ("duration", duration),
        ("users", count(run.users)),
        ("input rows", count(run.input_rows)),
        ("events", f"{events.get('first_event') or '—'} to {events.get('last_event') or '—'}"),
        ("config hash", f"{run.config_hash} ({same})"),
    ]
    bundle = metrics.get("bundle") or {}
    if bundle.get("path"):
        facts.append(("model bundle", f"{redact_text(str(bundle['path']))} (sha256 {str(bundle.get('content_sha256', ''))[:12]}…)"))
    scored = metrics.get("scored_with_bundle") or {}
    if scored.get("path"):
        facts.append(("scored with", f"bundle {redact_text(str(scored['path']))} of run {scored.get('run_id')}"))
    if metrics.get("error"):
        facts.append(("error", redact_text(str(metrics["error"]))))
    blocks: list = [Table(["", ""], facts)]

    stages = metrics.get("stage_seconds") or {}
    if stages:
        total = sum(float(v) for v in stages.values())
        ordered = sorted(stages.items(), key=lambda kv: (STAGE_ORDER.index(kv[0]) if kv[0] in STAGE_ORDER else 99, kv[0]))
        rows = [(name, f"{float(s):,.1f}", f"{float(s) / total:.0%}" if total else "—") for name, s in ordered]
        blocks.append(Table(["stage", "seconds", "share"], rows, caption="Stage seconds (runs.metrics.stage_seconds)",
                            numeric=(1, 2)))
    else:
        blocks.append(Note("The run recorded no stage seconds."))

    model_rows = []
    for model in data.MODELS:
        if model in ctx.models:
            k, reason = ctx.chosen(model)
            previous = ctx.run.model_metrics(model).get("previous_run_id")
            model_rows.append((model, count(k), reason or "—", previous or "none (first run)"))
        else:
            model_rows.append((model, "—", "not trained in this run", "—"))
            ctx.skip(f"model-{model}", f"model {model} has no segments in run {run.run_id} (it was not trained in this run)")
    blocks.append(Table(["model", "chosen k", "reason", "previous run"], model_rows, caption="Models", numeric=(1,)))
    if ctx.settings:
        rows = [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in flatten(ctx.settings)]
        blocks.append(Table(["key", "value"], rows, collapsed=True,
                            caption="Configuration this report was made with (secrets redacted)"))
    return Section("sec-run", "Run and configuration", blocks)


def sizes_section(ctx: ReportContext) -> Section:
    blocks: list = []
    if not ctx.models:
        blocks.append(ctx.skip("fig-sizes", f"run {ctx.run.run_id} has no segment profiles (no model was trained)"))
    for model in ctx.models:
        rows = ctx.model_profiles(model)
        k, _ = ctx.chosen(model)
        noise = rows[rows["segment"] == figures.NOISE_SEGMENT]
        extra = f"; segment -1 holds the noise ({float(noise['share'].iloc[0]):.1%})" if len(noise) else ""
        blocks.append(figure(
            f"fig-sizes-{model}",
            f"{model}: users per segment (k={count(k)}, {count(rows['size'].sum())} users); the share is of the run's "
            f"users{extra}.",
            f"Bar chart of segment sizes of model {model}",
            figures.draw_segment_sizes, rows, model,
        ))
        blocks.append(Table(
            ["segment", "name", "users", "share", "top features"],
            [(int(r.segment), r.segment_name, count(r.size), f"{r.share:.1%}", ", ".join(r.top_features) or "—")
             for r in rows.itertuples()],
            caption=f"{model}: segments", collapsed=True, numeric=(0, 2, 3),
        ))
    absent = [m for m in data.MODELS if m not in ctx.models]
    if absent and ctx.models:
        blocks.append(Note(f"Not trained in this run: {', '.join(absent)}."))
    return Section("sec-sizes", "Segment sizes", blocks)


def profiles_section(ctx: ReportContext) -> Section:
    blocks: list = [Paragraph(
        "Each cell is the segment's mean of a feature against all users of the run, in population standard "
        "deviations (segment_profiles.feature_zscores): red above average, blue below."
    )]
    if not ctx.models:
        blocks.append(ctx.skip("fig-zscores", f"run {ctx.run.run_id} has no segment profiles"))
    for model in ctx.models:
        rows = ctx.model_profiles(model)
        features = figures.feature_order(rows)
        if not features:
            blocks.append(ctx.skip(f"fig-zscores-{model}", f"{model}: the profiles hold no feature z-scores"))
            continue
        blocks.append(figure(
            f"fig-zscores-{model}",
            f"{model}: z-scores of {len(features)} features for {len(rows)} segments (colours clipped at ±3).",
            f"Heatmap of feature z-scores per segment of model {model}",
            figures.draw_zscore_heatmap, rows, model,
        ))
    return Section("sec-profiles", "Segment profiles", blocks)


def top_features_section(ctx: ReportContext) -> Section:
    blocks: list = [Paragraph(
        "What sets each segment apart: its features with the largest |z-score| (segment_profiles.top_features), in "
        "the features' own units against all users. \"Segment separation\" below compares the prepared features "
        "(what the models see) between segments."
    )]
    if not ctx.models:
        blocks.append(ctx.skip("fig-top-features", f"run {ctx.run.run_id} has no segment profiles"))
    for model in ctx.models:
        rows = ctx.model_profiles(model)
        blocks.append(figure(
            f"fig-top-features-{model}",
            f"{model}: the top distinguishing features of each segment (z-score; red above average, blue below).",
            f"Bar charts of the top features of each segment of model {model}",
            figures.draw_top_features, rows, model,
        ))
    return Section("sec-top-features", "Distinguishing features", blocks)


def separation_section(ctx: ReportContext) -> Section:
    blocks: list = [Paragraph(
        "How well each segment stands apart (runs.metrics.<model>.separation). Silhouette: the mean over the "
        "segment's sampled users of (b − a) / max(a, b), a being a user's mean distance to the other users of its "
        "segment and b to those of the nearest other segment. Near 1: the segment is compact and well apart; near 0 "
        "or negative: it overlaps its neighbour (the nearest segment). Measured on the run's silhouette sample "
        "(the first models.selection.silhouette_sample users of its hash sample) in the space the model clusters in "
        "(the prepared features; ae_hdbscan: its embeddings). Separating features: the segment's mean of each "
        "prepared feature (what the models see: imputed, log-transformed, capped, scaled) minus that of all other "
        "users, and minus that of its nearest segment, in standard deviations (σ) of the feature over the sweep's "
        "user sample, on which they are measured; the 3 largest of each, with their sign."
    )]
    if not ctx.models:
        blocks.append(ctx.skip("fig-separation", f"run {ctx.run.run_id} has no segment profiles"))
    for model in ctx.models:
        record = ctx.run.model_metrics(model).get("separation")
        if not isinstance(record, dict):
            blocks.append(ctx.skip(f"fig-separation-{model}", f"{model}: run {ctx.run.run_id} recorded no separation "
                                   "per segment (it was made by an earlier segspark)."))
            continue
        profiles = ctx.model_profiles(model)
        names = dict(zip(profiles["segment"], profiles["segment_name"], strict=True))
        found = {int(r["segment"]): r for r in record.get("segments") or []}
        per_segment = [found.get(int(s), {}) for s in profiles["segment"]]
        sampled = f"{count(record.get('silhouette_users'))} sampled users ({record.get('space') or 'its space'})"
        silhouettes = profiles[["segment", "segment_name"]].assign(silhouette=[r.get("silhouette") for r in per_segment])
        if silhouettes["silhouette"].notna().any():
            noise = " Segment -1 (noise) is not a cluster: it has no silhouette." if figures.NOISE_SEGMENT in names else ""
            blocks.append(figure(
                f"fig-separation-{model}",
                f"{model}: mean silhouette per segment on {sampled}; dashed: all segments together.{noise}",
                f"Bar chart of the silhouette per segment of model {model}",
                figures.draw_segment_silhouettes, silhouettes, model, record.get("silhouette"),
            ))
        else:
            blocks.append(ctx.skip(f"fig-separation-{model}",
                                   f"{model}: no silhouette per segment: fewer than two segments among {sampled}."))
        rows = [
            (int(p.segment), p.segment_name, count(p.size), number(r.get("silhouette"), 3),
             count(r.get("silhouette_users")),
             "—" if r.get("nearest") is None else segment_text(r["nearest"], names.get(r["nearest"])),
             differences(r.get("versus_rest")), differences(r.get("versus_nearest")))
            for p, r in zip(profiles.itertuples(), per_segment, strict=True)
        ]
        blocks.append(Table(
            ["segment", "name", "users", "silhouette", "sampled users", "nearest segment",
             "sets it apart from the rest", "from its nearest segment"],
            rows, caption=f"{model}: separation per segment; silhouette on {sampled}, features on "
                          f"{count(record.get('feature_users'))} sampled users",
            numeric=(0, 2, 3, 4),
        ))
    return Section("sec-separation", "Segment separation", blocks)


def differences(pairs, top: int = 3) -> str:
    """`sessions_per_week +1.8σ, price_viewed_mean −1.2σ` (a true minus sign) of [[feature, value], ...]."""
    shown = [f"{name} {'−' if float(value) < 0 else '+'}{abs(float(value)):.1f}σ" for name, value in (pairs or [])[:top]]
    return ", ".join(shown) or "—"


def projection_section(ctx: ReportContext) -> Section:
    blocks: list = []
    run_id = ctx.run.run_id
    sample = data.projection_sample(ctx.spark, ctx.output, run_id, ctx.models, limit=PROJECTION_USERS)
    if sample is None or sample.source != "embeddings":
        why = (f"model {data.EMBEDDING_MODEL} was not trained in this run" if data.EMBEDDING_MODEL not in ctx.models
               else "the run has no user_embeddings rows")
        blocks.append(ctx.skip(
            "fig-projection-embeddings",
            f"No projection of the autoencoder embeddings: {why}."
            + (f" Shown instead: the standardised numeric user features, coloured by {sample.model} segment."
               if sample is not None else ""),
        ))
    if sample is None:
        blocks.append(ctx.skip("fig-projection-features", f"run {run_id} has no user features with segments to project"))
        return Section("sec-projection", "Users in two dimensions", blocks)
    projected = project(sample)
    id_ = f"fig-projection-{sample.source}"
    if projected is None:
        blocks.append(ctx.skip(id_, f"the sample of {len(sample.segments)} users has too few users or no varying column"))
        return Section("sec-projection", "Users in two dimensions", blocks)
    what = ("autoencoder embeddings (user_embeddings)" if sample.source == "embeddings"
            else f"standardised numeric user features ({projected.inputs} columns, nulls imputed with the sample median)")
    users = len(sample.segments)
    of = f" of {count(ctx.run.users)}" if ctx.run.users else ""
    blocks.append(figure(
        id_,
        f"PCA of the {what} of {users:,}{of} users (the {PROJECTION_USERS:,} smallest xxhash64 of user_id, at most), "
        f"coloured by {sample.model} segment; the axes show the central 99% of points.",
        f"Scatter plot of users in two dimensions coloured by {sample.model} segment",
        figures.draw_projection, projected.coords, sample.segments, sample.names,
        f"{sample.model} segments, PCA of the {sample.source}", projected.explained,
    ))
    return Section("sec-projection", "Users in two dimensions", blocks)


def selection_section(ctx: ReportContext) -> Section:
    blocks: list = []
    sweep_models = list(dict.fromkeys(ctx.selection["model"]))
    if not sweep_models:
        blocks.append(ctx.skip("fig-selection", f"run {ctx.run.run_id} has no model_selection rows"))
    for model in sweep_models:
        sweep = ctx.selection[ctx.selection["model"] == model]
        k, reason = ctx.chosen(model)
        blocks.append(Paragraph(f"{model}: {reason or 'no reason recorded'}"))
        if sweep["k"].nunique() < 2:
            blocks.append(ctx.skip(f"fig-selection-{model}",
                                   f"{model}: one k only (k={count(k)}), so there is no curve to draw."))
            continue
        blocks.append(figure(
            f"fig-selection-{model}",
            f"{model}: criteria of the k sweep (best seed per k); the dashed line marks the chosen k={count(k)}. "
            f"Reason: {reason or '—'}",
            f"Line charts of the k-selection criteria of model {model}",
            figures.draw_selection_curves, sweep, model, k,
        ))
    if len(ctx.selection):
        rows = [
            (r.model, int(r.k), "yes" if r.chosen else "", number(r.silhouette), number(r.davies_bouldin),
             number(r.calinski_harabasz), number(r.dunn), number(r.wss), number(r.bic), number(r.seed_ari, 3),
             count(r.seeds), count(r.sample_users))
            for r in ctx.selection.itertuples()
        ]
        blocks.append(Table(
            ["model", "k", "chosen", "silhouette", "Davies-Bouldin", "Calinski-Harabasz", "Dunn", "WSS", "BIC",
             "seed ARI", "seeds", "sample users"],
            rows, caption="All values of the sweep (model_selection), measured on the sweep's user sample",
            collapsed=True, numeric=(1, 3, 4, 5, 6, 7, 8, 9, 10, 11),
        ))
    return Section("sec-selection", "Choosing k", blocks)


def scores_section(ctx: ReportContext) -> Section:
    run_id = ctx.run.run_id
    blocks: list = []
    soft = data.SOFT_MODEL
    gmm = data.membership(ctx.spark, ctx.output, run_id, soft, MEMBERSHIP_BINS) if soft in ctx.models else None
    if gmm is None:
        why = (f"model {soft} was not trained in this run" if soft not in ctx.models
               else f"the run has no {soft} rows in user_segments")
        blocks.append(ctx.skip("fig-gmm-membership", f"No GMM membership distribution: {why}."))
    else:
        histogram, per_segment = gmm
        blocks.append(figure(
            "fig-gmm-membership",
            f"gmm: distribution of each user's membership probability of its segment ({MEMBERSHIP_BINS} bins), and "
            "its mean per segment (in brackets: users below 0.5, i.e. between segments).",
            "Histogram of GMM membership probabilities and mean probability per segment",
            figures.draw_membership, histogram, per_segment, soft, MEMBERSHIP_BINS,
        ))
    scores = data.anomaly_scores(ctx.spark, ctx.output, run_id, ANOMALY_BINS)
    if scores is None:
        blocks.append(ctx.skip("fig-anomaly-scores", f"run {run_id} has no anomaly scores in user_segments"))
    else:
        stats, histogram = scores
        blocks.append(figure(
            "fig-anomaly-scores",
            "anomaly_score per model (each model's own scale, from its minimum to its 99th percentile; higher is "
            "more unusual); the dashed line is the lowest score flagged is_anomaly.",
            "Histograms of anomaly scores per model",
            figures.draw_anomaly_scores, stats, histogram, ANOMALY_BINS,
        ))
        rows = [
            (r.model, count(r.users), count(r.anomalies), f"{(r.anomalies or 0) / r.users:.2%}" if r.users else "—",
             number(r.threshold), number(r.max))
            for r in stats.itertuples()
        ]
        blocks.append(Table(["model", "users", "flagged", "share", "lowest flagged score", "highest score"], rows,
                            numeric=(1, 2, 3, 4, 5)))
    return Section("sec-scores", "Membership and anomaly scores", blocks)


def transitions_section(ctx: ReportContext) -> Section:
    run_id = ctx.run.run_id
    flows = data.transitions(ctx.spark, ctx.output, run_id)
    blocks: list = [Paragraph(
        "Users by their segment in the previous successful run (rows) and in this run (columns), per model "
        "(segment_transitions). Segment ids are stable across runs: matched by member overlap."
    )]
    with_flows = [m for m in ctx.models if (flows["model"] == m).any()]
    if not with_flows:
        blocks.append(ctx.skip(
            "sec-transitions",
            f"No transitions: run {run_id} has no previous successful run of the same models to compare with "
            "(the first run of an output root); they appear from the next run on.",
        ))
        return Section("sec-transitions", "Transitions since the previous run", blocks)
    for model in ctx.models:
        if model not in with_flows:
            blocks.append(ctx.skip(f"fig-transitions-{model}", f"{model}: no previous run of this model to compare with."))
            continue
        previous = ctx.run.model_metrics(model).get("previous_run_id")
        rows = flows[flows["model"] == model]
        from_names = data.profile_names(ctx.spark, ctx.output, previous, model) if previous else {}
        to_names = dict(zip(ctx.model_profiles(model)["segment"], ctx.model_profiles(model)["segment_name"], strict=True))
        stayed = int(rows[rows["from_segment"] == rows["to_segment"]]["users"].sum())
        both = int(rows[rows["from_segment"].notna() & rows["to_segment"].notna()]["users"].sum())
        share = f"{stayed / both:.1%}" if both else "—"
        blocks.append(figure(
            f"fig-transitions-{model}",
            f"{model}: {previous or 'previous run'} → {run_id}; {stayed:,} of {both:,} users in both runs ({share}) kept "
            "their segment (log colour scale).",
            f"Heatmap of users moving between segments of model {model}",
            figures.draw_transitions, rows, model, previous, run_id, from_names, to_names,
        ))
    return Section("sec-transitions", "Transitions since the previous run", blocks)


def quality_section(ctx: ReportContext) -> Section:
    run = ctx.run
    blocks: list = []
    if run.input_rows is None or run.clean_rows is None or run.quarantined_rows is None:
        blocks.append(ctx.skip("fig-data-quality", f"run {run.run_id} recorded no input counts"))
        return Section("sec-quality", "Data quality", blocks)
    balanced = run.input_rows == run.clean_rows + run.quarantined_rows
    blocks.append(Table(
        ["input rows", "clean rows", "quarantined rows", "input = clean + quarantined"],
        [(count(run.input_rows), count(run.clean_rows), count(run.quarantined_rows),
          "yes" if balanced else f"NO (off by {run.input_rows - run.clean_rows - run.quarantined_rows:,})")],
        numeric=(0, 1, 2),
    ))
    skipped = [str(path) for path in run.metrics.get("skipped_files") or []]
    if skipped:
        blocks.append(Paragraph(
            f"{len(skipped):,} unreadable input file{'s were' if len(skipped) > 1 else ' was'} skipped "
            "(input.on_corrupt_file: skip); no record of a skipped file is counted above."
        ))
        blocks.append(Table(["skipped file"], [(path,) for path in skipped], collapsed=len(skipped) > 10))
    table = data.quarantine_counts(ctx.spark, ctx.output, run.run_id)
    recorded = {str(k): int(v) for k, v in (run.metrics.get("quarantine_reasons") or {}).items()}
    if table is None:
        blocks.append(Note("The quarantine table does not exist; the reasons below are those the run recorded."))
        table = pd.DataFrame({"reason": list(recorded), "rows": list(recorded.values())})
    if len(table) or recorded:
        reasons = sorted(set(table["reason"]) | set(recorded))
        in_table = dict(zip(table["reason"], table["rows"], strict=True))
        rows = [(r, count(in_table.get(r, 0)), count(recorded.get(r, 0))) for r in reasons]
        blocks.append(Table(["reason", "rows in quarantine", "recorded in runs"], rows, numeric=(1, 2)))
    else:
        blocks.append(Paragraph("No input record was quarantined."))
    blocks.append(figure(
        "fig-data-quality",
        f"{count(run.input_rows)} input rows: {count(run.clean_rows)} clean, {count(run.quarantined_rows)} quarantined "
        "(left); quarantined records per reason, from the quarantine table (right).",
        "Bar charts of clean and quarantined rows and quarantine reasons",
        figures.draw_data_quality, int(run.clean_rows), table,
    ))
    return Section("sec-quality", "Data quality", blocks)


def drift_section(ctx: ReportContext) -> Section:
    drift = data.latest_drift(ctx.spark, ctx.output)
    blocks: list = []
    if drift is None:
        blocks.append(ctx.skip(
            "sec-drift",
            f"No streaming drift: there is no segment_drift table under output.root={ctx.output.root} "
            "(no `segspark stream` has written to it).",
        ))
    elif drift.empty:
        blocks.append(ctx.skip("sec-drift", "No streaming drift: the segment_drift table has no rows yet."))
    else:
        blocks.append(Paragraph(
            "The latest micro-batch of every stream and model (segment_drift): drift of the scored users against "
            "the training run of the stream's bundle. This is not filtered by run id."
        ))
        rows = [
            (r.app_id, count(r.batch_id), when(r.as_of), r.model, count(r.users), number(r.max_psi, 3),
             number(r.max_centroid_shift, 3), number(r.max_size_change, 3), number(r.noise_share, 3),
             "YES" if r.retrain_recommended else "no", "; ".join(r.reasons) or "—", when(r.processed_at))
            for r in drift.itertuples()
        ]
        blocks.append(Table(
            ["stream", "batch", "as of", "model", "users", "max PSI", "max centroid shift", "max size change",
             "noise share", "retrain", "reasons", "processed"],
            rows, numeric=(1, 4, 5, 6, 7, 8),
        ))
    return Section("sec-drift", "Streaming drift", blocks)


SECTIONS = (
    run_section,
    sizes_section,
    profiles_section,
    top_features_section,
    separation_section,
    projection_section,
    selection_section,
    scores_section,
    transitions_section,
    quality_section,
    drift_section,
)
