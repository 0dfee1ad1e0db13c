"""`write_report`: one self-contained HTML file for one run (`segspark report`)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from pyspark.sql import SparkSession

from segspark.config import Config
from segspark.io.files import write_text_file
from segspark.report import data
from segspark.report.html import FigureBlock, render_page
from segspark.report.sections import SECTIONS, ReportContext, Skipped
from segspark.runtime.run_ids import check_run_id, owned_child

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportResult:
    path: str  # the HTML file written
    run_id: str
    figures: list[str]  # ids of the figures in the page, in page order
    skipped: list[Skipped]  # figures and sections left out, with the reason shown in their place
    size_bytes: int = 0  # of the file written


def default_path(cfg: Config, run_id: str) -> str:
    """`<output.root>/_reports/<run_id>/report.html`, for a valid run id (segspark.runtime.run_ids) only; on a
    local file system the folder is checked to resolve inside `_reports`."""
    folder = f"{cfg.output.root.rstrip('/')}/_reports"
    check_run_id(run_id, "the run id of the report (its folder under output.root/_reports)")
    parsed = urlparse(folder)
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive
        owned_child(unquote(parsed.path) if parsed.scheme == "file" else folder, run_id)
    return f"{folder}/{run_id}/report.html"


def write_report(spark: SparkSession, cfg: Config, run_id: str | None = None, out: str | None = None) -> ReportResult:
    """Write the HTML report of run `run_id` (default: the latest succeeded run with segments) to
    `out` (default: `default_path`). UsageError when there are no runs or `run_id` is not one."""
    start = time.perf_counter()
    if run_id is not None:
        check_run_id(run_id)
    run = data.resolve_run(spark, cfg.output, run_id)
    path = out or default_path(cfg, run.run_id)  # an id read back from `runs` is checked before any work
    ctx = ReportContext(
        spark=spark,
        output=cfg.output,
        run=run,
        config_hash=cfg.config_hash(),
        profiles=data.segment_profiles(spark, cfg.output, run.run_id),
        selection=data.model_selection(spark, cfg.output, run.run_id),
        settings=cfg.redacted(),
    )
    log.info("report: run %s (%s, as of %s): models %s", run.run_id, run.status, run.as_of, ", ".join(ctx.models) or "none")
    sections = []
    for build in SECTIONS:
        section_start = time.perf_counter()
        sections.append(build(ctx))
        log.info("report: section %s in %.1f s", sections[-1].id, time.perf_counter() - section_start)
    generated = dt.datetime.now(dt.UTC)
    subtitle = " · ".join(
        part for part in (
            f"as of {run.as_of}" if run.as_of else None,
            f"status {run.status}",
            f"{run.users:,} users" if run.users is not None else None,
            f"models: {', '.join(ctx.models)}" if ctx.models else "no models",
            f"finished {run.finished_at:%Y-%m-%d %H:%M} UTC" if run.finished_at else None,
        ) if part
    )
    page = render_page(f"segspark report — run {run.run_id}", subtitle, sections, generated)
    size = write_text_file(path, page)
    figure_ids = [b.id for s in sections for b in s.blocks if isinstance(b, FigureBlock)]
    log.info("report: wrote %s (%.2f MB, %d figures, %d left out) in %.1f s", path, size / 1e6, len(figure_ids),
             len(ctx.skipped), time.perf_counter() - start)
    return ReportResult(path=path, run_id=run.run_id, figures=figure_ids, skipped=list(ctx.skipped), size_bytes=size)

