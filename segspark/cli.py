"""Command line: `segspark generate|run|features|train|score|stream|report ...` (also `python -m segspark`).

Thin: parses arguments, loads the config, gets a session and calls the library. Exit codes:
0 success, 2 bad usage/config/input schema (one clear message, no traceback), 1 failure at run time.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from contextlib import contextmanager

import click

from segspark.errors import UsageError
from segspark.runtime import progress
from segspark.runtime.redaction import redact_text

log = logging.getLogger("segspark")

RUN_ID_HELP = (
    "Run id (default: a new one). Re-running an id replaces its rows. 1-128 letters, digits, '.', '_', '-', "
    "starting with a letter or digit, no '..', not starting with segspark-stream or <streaming.app_id>-."
)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log record (schedulers and log collectors parse these, not prose)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _LogHandler(logging.StreamHandler):
    """stderr handler that first wipes the progress line, so log lines never run into it."""

    def emit(self, record: logging.LogRecord) -> None:
        progress.clear_line()
        super().emit(record)


def _configure_logging(verbose: bool, quiet: bool, log_format: str = "text") -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _LogHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if log_format == "json" else logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler])
    for noisy in ("py4j", "urllib3", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def _session(app_name: str, master: str | None = None, conf: dict | None = None, remote: str | None = None):
    from segspark.runtime.session import spark_session

    with spark_session(app_name, master or "local[2]", conf, remote) as spark:
        if _is_job():
            # A jobs/*.py entry point: say what the job runs on (master, executors, their Python).
            from segspark.runtime.cluster import log_cluster

            log_cluster(spark)
        yield spark


def _is_job() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and (ctx.find_root().obj or {}).get("job"))


def _run_id(ctx, param, value: str | None) -> str | None:
    """--run-id must match the run-id pattern (segspark.runtime.run_ids) before anything starts."""
    from segspark.runtime.run_ids import check_run_id

    return None if value is None else check_run_id(value)


def _batch_run_id(run_id: str | None, cfg) -> None:
    """A batch command's --run-id outside the stream's namespace, checked before Spark starts."""
    from segspark.runtime.run_ids import check_batch_run_id

    if run_id is not None:
        check_batch_run_id(run_id, cfg.streaming.app_id)


def _key_checked(cfg) -> None:
    """A command that ingests events: a missing or short pseudonym key fails now, before Spark starts."""
    from segspark.ingest.privacy import check_key_before_spark

    check_key_before_spark(cfg.privacy)


def _parse_date(ctx, param, value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date like 2026-10-31") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object per log line (time, level, logger, message), for schedulers.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool, log_format: str) -> None:
    """segspark: customer segmentation on Apache Spark, written to Delta tables.

    On a terminal, long stages show a progress line (stage, rows, elapsed, Spark tasks); piped or
    captured output gets log lines only.

    \b
    Examples:
      segspark generate --out sample --users 5000
      segspark run --config conf/local.yaml --set input.path=sample/events
      segspark report --config conf/local.yaml
      segspark --log-format json -q run --config conf/local.yaml    # for a scheduler
      segspark run --help
    """
    _configure_logging(verbose, quiet, log_format)
    ctx.ensure_object(dict)["progress"] = not quiet and log_format == "text"


def _progress(spark):
    """Stage progress on stderr for this command, when the user wants it and stderr is a terminal."""
    root = click.get_current_context().find_root()
    return progress.watch(sys.stderr, spark, enabled=bool((root.obj or {}).get("progress", True)))


@cli.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--users", required=True, type=click.IntRange(min=1), help="Number of users.")
@click.option("--days", default=90, show_default=True, type=click.IntRange(min=1), help="Days of history.")
@click.option("--seed", default=42, show_default=True, type=int, help="Random seed (same seed, same data).")
@click.option("--format", "fmt", default=None, type=click.Choice(["parquet", "json", "csv"]),
              help="Output format [default: parquet for rees46, csv for invoices].")
@click.option("--duplicates", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Share of events emitted twice.")
@click.option("--missing-prices", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Share of events without price.")
@click.option("--malformed", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Share of extra malformed lines (json/csv).")
@click.option("--personas", default="clean", show_default=True,
              help="Persona set: clean (well separated), overlapping (mixtures of shared traits, wide blur) or "
                   "emerging (one persona the clean set lacks).")
@click.option("--layout", default="rees46", show_default=True, type=click.Choice(["rees46", "invoices"]),
              help="rees46: clickstream events; invoices: the purchases as invoice lines in the UCI Online "
                   "Retail layout, with cancellations (read with conf/generated_invoices.yaml).")
@click.option("--overwrite", is_flag=True, help="Replace DIR/events and DIR/truth if they exist (else refused).")
@click.option("--master", default=None,
              help="Generate in a Spark session on this master. Without it, a sample of up to 100,000 users on "
                   "a local path is written by this process alone (the same files, no Spark to start); a "
                   "larger one in a local[2] session.")
def generate(out_dir, users, days, seed, fmt, duplicates, missing_prices, malformed, personas, layout, overwrite,
             master) -> None:
    """Write a synthetic clickstream (or invoice lines) with planted personas.

    DIR/events/ holds the events in the chosen format, DIR/truth/ (Parquet) each user's persona.
    With --layout invoices, DIR/events/ holds invoice lines (InvoiceNo, StockCode, Description,
    Quantity, InvoiceDate, UnitPrice, CustomerID, Country) and DIR/truth/ only the users who bought.
    Existing DIR/events or DIR/truth are replaced only with --overwrite.

    \b
    Examples:
      segspark generate --out sample --users 10000 --days 60 --format json --duplicates 0.01
      segspark generate --out invoices --users 5000 --layout invoices --personas overlapping
    """
    from segspark.datagen import GenerateSpec, check_out_dir, write_dataset
    from segspark.datagen_local import write_dataset_on_driver, writes_on_driver

    check_out_dir(out_dir, overwrite)  # before Spark starts
    fmt = fmt or ("csv" if layout == "invoices" else "parquet")
    if malformed > 0 and fmt == "parquet":
        raise click.UsageError("--malformed needs a text format: add --format json or --format csv")
    try:
        spec = GenerateSpec(
            users=users,
            days=days,
            seed=seed,
            duplicate_share=duplicates,
            missing_price_share=missing_prices,
            malformed_share=malformed,
            personas=personas,
            layout=layout,
        )
    except ValueError as exc:  # names the allowed values
        raise click.BadParameter(str(exc)) from None
    if master is None and not _is_job() and writes_on_driver(spec, out_dir):
        summary = write_dataset_on_driver(spec, out_dir, fmt, overwrite=overwrite)  # no Spark to start
    else:
        with _session("segspark-generate", master) as spark:
            summary = write_dataset(spark, spec, out_dir, fmt, overwrite=overwrite)
    click.echo(f"events: {out_dir}/events ({fmt})   truth: {out_dir}/truth")
    for key, value in summary.items():
        click.echo(f"  {key}: {value}")


@cli.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--run-id", default=None, callback=_run_id, help=RUN_ID_HELP)
@click.option("--as-of", default=None, callback=_parse_date, help="Feature date YYYY-MM-DD (default: end of data).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.argument("more_overrides", nargs=-1, metavar="[KEY=VALUE]...")
def run_command(config_path, run_id, as_of, overrides, more_overrides) -> None:
    """Run the whole batch pipeline: ingest, features, segments, Delta tables.

    \b
    Examples:
      segspark run --config conf/local.yaml
      segspark run --config conf/local.yaml --run-id daily-2026-10-31 --as-of 2026-10-31 \\
          --set input.path=/data/events output.root=/tmp/segspark
    """
    from segspark import usecases
    from segspark.config import load_config

    cfg = load_config(config_path, _overrides(overrides, more_overrides))
    _batch_run_id(run_id, cfg)
    _key_checked(cfg)
    with _session(cfg.spark.app_name, cfg.spark.master, _spark_conf(cfg, batch=True), cfg.spark.remote) as spark, _progress(spark):
        result = usecases.run(spark, cfg, run_id=run_id, as_of=as_of)
    _print_summary(result)


@cli.command("features")
@click.option("--list", "list_catalog", is_flag=True, help="Print the feature catalog and exit.")
@click.option("--markdown", is_flag=True, help="With --list: print the catalog as a Markdown table.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--run-id", default=None, callback=_run_id, help=RUN_ID_HELP)
@click.option("--as-of", default=None, callback=_parse_date, help="Feature date YYYY-MM-DD (default: end of data).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.argument("more_overrides", nargs=-1, metavar="[KEY=VALUE]...")
def features_command(list_catalog, markdown, config_path, run_id, as_of, overrides, more_overrides) -> None:
    """Ingest and compute user features only (tables quarantine, user_features, runs).

    \b
    Examples:
      segspark features --list
      segspark features --list --config conf/clickstream.yaml
      segspark features --config conf/local.yaml --as-of 2026-10-31
    """
    from segspark.config import load_config

    cfg = load_config(config_path, _overrides(overrides, more_overrides)) if config_path else None
    if list_catalog:
        # With --config, the slot families are as wide as that config makes them.
        from segspark.features.catalog import render_markdown, render_table

        render = render_markdown if markdown else render_table
        click.echo(render(cfg.features if cfg else None), nl=not markdown)
        return
    if cfg is None:
        raise click.UsageError("give --config FILE (or --list for the feature catalog)")
    from segspark import usecases

    _batch_run_id(run_id, cfg)
    _key_checked(cfg)
    with _session(cfg.spark.app_name, cfg.spark.master, _spark_conf(cfg, batch=True), cfg.spark.remote) as spark, _progress(spark):
        result = usecases.features(spark, cfg, run_id=run_id, as_of=as_of)
    _print_summary(result)


@cli.command("train")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option(
    "--run-id", default=None, callback=_run_id,
    help="The `segspark features` run to train on (default: the latest succeeded run).",
)
@click.option("--as-of", default=None, callback=_parse_date, help="Check that the run's features are as of this date.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.argument("more_overrides", nargs=-1, metavar="[KEY=VALUE]...")
def train_command(config_path, run_id, as_of, overrides, more_overrides) -> None:
    """Train the models on the features of an earlier `segspark features` run.

    Reads that run's rows of user_features, fits every enabled model, writes user_segments,
    user_embeddings, model_selection, segment_profiles and segment_transitions and the model bundle
    under the same run id, and completes the run's row in `runs` (its input counts are kept).
    `segspark features` + `segspark train` give what `segspark run` gives in one go.

    \b
    Examples:
      segspark features --config conf/local.yaml --run-id 2026-11-30
      segspark train --config conf/local.yaml --run-id 2026-11-30 --set models.gmm.enabled=false
    """
    from segspark import usecases
    from segspark.config import load_config

    cfg = load_config(config_path, _overrides(overrides, more_overrides))
    _batch_run_id(run_id, cfg)
    with _session(cfg.spark.app_name, cfg.spark.master, _spark_conf(cfg, batch=True), cfg.spark.remote) as spark, _progress(spark):
        result = usecases.train(spark, cfg, run_id=run_id, as_of=as_of)
    _print_summary(result)


@cli.command("score")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--bundle", "bundle_dir", required=True, help="Model bundle of a training run (output.root/_models/<run_id>).")
@click.option("--run-id", default=None, callback=_run_id, help=RUN_ID_HELP)
@click.option("--as-of", default=None, callback=_parse_date, help="Feature date YYYY-MM-DD (default: end of data).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.argument("more_overrides", nargs=-1, metavar="[KEY=VALUE]...")
def score_command(config_path, bundle_dir, run_id, as_of, overrides, more_overrides) -> None:
    """Assign segments to new data with the models of an existing bundle, without retraining.

    Ingests the input, computes its user features, checks the bundle (every file's checksum) and the
    features (names and types the models were trained on), then writes user_segments (stable ids and
    names of the training run) and user_embeddings for this run.

    \b
    Example:
      segspark score --config conf/local.yaml --bundle out/local/_models/2026-10-31 \\
          --set input.path=/data/events-november
    """
    from segspark import usecases
    from segspark.config import load_config

    cfg = load_config(config_path, _overrides(overrides, more_overrides))
    _batch_run_id(run_id, cfg)
    from segspark.bundle.manifest import open_bundle
    from segspark.bundle.store import bundle_signing

    # A broken, tampered or (with bundle.signing_key_env) unsigned bundle fails now, before Spark starts.
    open_bundle(bundle_dir, signing=bundle_signing(cfg.bundle))
    _key_checked(cfg)
    with _session(cfg.spark.app_name, cfg.spark.master, _spark_conf(cfg, batch=True), cfg.spark.remote) as spark, _progress(spark):
        result = usecases.score(spark, cfg, run_id=run_id, as_of=as_of, bundle=bundle_dir)
    _print_summary(result)


@cli.command("stream")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--available-now", is_flag=True, help="Process the files (or messages) there now, then stop.")
@click.option("--bundle", "bundle_dir", default=None,
              help="Model bundle to score with (default: streaming.bundle, else the latest successful training run's).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.argument("more_overrides", nargs=-1, metavar="[KEY=VALUE]...")
def stream_command(config_path, available_now, bundle_dir, overrides, more_overrides) -> None:
    """Assign segments to users as their events arrive (Structured Streaming).

    Reads the landing folder input.path (json, csv or parquet files, with the batch column mapping
    and quarantine), MQTT (input.format mqtt: messages of input.mqtt land in input.path first) or
    Kafka (input.format kafka), merges each micro-batch into the feature state,
    scores the users it touched with every model of the bundle into user_segments_live, moves the
    online k-means centres, and writes drift and a retrain recommendation to segment_drift.
    Exactly once per micro-batch; restart from the same streaming.checkpoint to resume.

    \b
    Example:
      segspark stream --config conf/local.yaml --available-now --set input.path=/landing/events
    """
    from segspark.config import load_config
    from segspark.streaming.identity import StreamLock
    from segspark.streaming.job import check_stream_identity, run_stream

    cfg = load_config(config_path, _overrides(overrides, more_overrides))
    if bundle_dir is not None:
        from segspark.bundle.manifest import open_bundle
        from segspark.bundle.store import bundle_signing

        open_bundle(bundle_dir, signing=bundle_signing(cfg.bundle))  # a broken bundle fails now, before Spark starts
    # A live stream on this app_id, or a checkpoint that does not own the tables, fails now, before
    # Spark starts; run_stream checks both again while it holds the lock.
    with StreamLock(cfg.output.root, cfg.streaming.app_id).acquire(checkpoint=cfg.streaming.checkpoint_path(cfg.output)):
        pass
    check_stream_identity(cfg)
    if cfg.input.format == "mqtt":
        from segspark.streaming.mqtt_landing import check_source

        check_source(cfg.input)  # a non-local landing folder or an unreachable broker fails now, before Spark starts
    _key_checked(cfg)
    with _session(cfg.spark.app_name, cfg.spark.master, _spark_conf(cfg), cfg.spark.remote) as spark:
        run = run_stream(spark, cfg, available_now=available_now, bundle=bundle_dir)
    summary = run.summary()
    click.echo(f"stream {run.run_id} (app {cfg.streaming.app_id}) stopped after {summary['batches']} micro-batches"
               f"{' (+' + str(summary['replayed_batches']) + ' already committed)' if summary['replayed_batches'] else ''}")
    click.echo(f"  input rows {summary['input_rows']:,} = clean {summary['clean_rows']:,} + quarantined "
               f"{summary['quarantined_rows']:,}; users assigned {summary['users_assigned']:,}; as of {summary['as_of']}")
    click.echo(f"  bundle {run.bundle}")
    if summary["retrain_recommended"]:
        click.echo("  RETRAIN RECOMMENDED: " + "; ".join(summary["retrain_reasons"]))
    click.echo(f"  tables: user_segments_live, segment_drift, segment_centroids_online, stream_batches under {cfg.output.root}")


@cli.command("report")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@click.option("--run-id", default=None, callback=_run_id,
              help="Run to report on (default: the latest succeeded run with segments).")
@click.option("--out", "out_path", default=None, help="HTML file to write (default: output.root/_reports/<run_id>/report.html).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key (repeatable).")
@click.argument("more_overrides", nargs=-1, metavar="[KEY=VALUE]...")
def report_command(config_path, run_id, out_path, overrides, more_overrides) -> None:
    """Write one self-contained HTML report of a run and print its path.

    Segment sizes, profiles and distinguishing features per model, a 2-D projection of a bounded
    user sample, the k-selection curves, GMM membership and anomaly scores, transitions since the
    previous run, data quality, run metadata and streaming drift. Figures are embedded: the file
    opens offline. What a run lacks (a disabled model, no previous run) is a note in the page.

    \b
    Examples:
      segspark report --config conf/local.yaml
      segspark report --config conf/local.yaml --run-id daily-2026-10-31 --out /tmp/report.html
    """
    from segspark.config import load_config
    from segspark.report import write_report

    cfg = load_config(config_path, _overrides(overrides, more_overrides))
    with _session(cfg.spark.app_name, cfg.spark.master, _spark_conf(cfg), cfg.spark.remote) as spark:
        result = write_report(spark, cfg, run_id=run_id, out=out_path)
    click.echo(f"report of run {result.run_id}: {len(result.figures)} figures, {result.size_bytes / 1e6:.1f} MB")
    if result.skipped:
        click.echo("  left out: " + "; ".join(f"{s.id} ({s.reason})" for s in result.skipped))
    click.echo(str(result.path))


def _overrides(flagged: Sequence[str], trailing: Sequence[str]) -> list[str]:
    """`--set a=1 --set b=2` and `--set a=1 b=2` (DESIGN.md's form) mean the same."""
    for text in trailing:
        if "=" not in text:
            raise click.UsageError(f"unexpected argument {text!r}: overrides look like --set dotted.key=value")
    return [*flagged, *trailing]


def _spark_conf(cfg, batch: bool = False) -> dict[str, str]:
    """The settings of a session segspark builds (with `auto` shuffle partitions, runs size their own);
    `batch`: a batch command's, whose driver compiles by the size of its input (spark.jit)."""
    from segspark.runtime.jit import driver_jit_conf

    pinned = {} if cfg.spark.shuffle_partitions == "auto" else {"spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions)}
    return {**pinned, **cfg.spark.conf, **(driver_jit_conf(cfg.spark, cfg.input) if batch else {})}


def _print_summary(result) -> None:
    """The final summary: counts, each model's choice, a table of segments, stage times, tables."""
    total = sum(result.stage_seconds.values())
    click.echo(f"run {result.run_id} {result.status} (as of {result.as_of}, {total:,.1f} s)")
    click.echo(
        f"  input rows {result.input_rows:,} = clean {result.clean_rows:,} + quarantined {result.quarantined_rows:,}"
    )
    click.echo(f"  users {result.users:,}")
    skipped = result.metrics.get("skipped_files") or []
    if skipped:
        click.echo(f"  skipped {len(skipped):,} unreadable input files (input.on_corrupt_file=skip): {', '.join(skipped)}")
    for warning in result.metrics.get("warnings") or []:
        click.echo(f"  warning: {warning}")
    bundle = result.metrics.get("scored_with_bundle")
    models = list(dict.fromkeys(seg["model"] for seg in result.segments))
    for model in models:
        reason = result.metrics.get(model, {}).get("reason") or (
            f"segments of training run {bundle['run_id']} (bundle {bundle['path']})" if bundle else ""
        )
        click.echo(f"  {model}: {reason}")
    if result.segments:
        rows = [
            [seg["model"], seg["segment"], seg["size"], f"{seg['size'] / result.users:.1%}" if result.users else "",
             seg["name"]]
            for seg in result.segments
        ]
        click.echo("")
        click.echo(format_table(["model", "segment", "users", "share", "name"], rows))
    if result.stage_seconds:
        click.echo("")
        stages = [[name, f"{seconds:,.1f}"] for name, seconds in result.stage_seconds.items()]
        click.echo(format_table(["stage", "seconds"], stages))
    click.echo("")
    click.echo(format_table(["table", "location"], [[name, path] for name, path in result.tables.items()]))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: numbers right-aligned (with thousands separators), text left-aligned."""
    def text(value: object) -> str:
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)

    cells = [[text(v) for v in row] for row in rows]
    numeric = [bool(rows) and all(_is_number(row[i]) for row in cells) for i in range(len(headers))]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  " + "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        ).rstrip()

    rule = "  " + "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in cells)])


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return False


def main(argv: Sequence[str] | None = None, job: bool = False) -> int:
    """Console entry point; returns the exit code. job: called by a jobs/*.py entry point (spark-submit,
    a Databricks task), which logs the master, the executors and their Python at the start."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="segspark", standalone_mode=False,
                 obj={"job": job})
        return 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:  # usage errors from click itself
        exc.show()
        return 2
    except UsageError as exc:
        click.echo(f"error: {redact_text(str(exc))}", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - a run-time failure: log it fully, exit 1
        # Error texts may quote a URL or connection string with its credentials: redacted like the config.
        log.error("failed: %s: %s", type(exc).__name__, redact_text(str(exc)), exc_info=log.isEnabledFor(logging.DEBUG))
        click.echo(f"error: {type(exc).__name__}: {redact_text(_first_line(exc))} (run with -v for the traceback)",
                   err=True)
        return 1


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
