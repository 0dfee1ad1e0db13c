"""`segspark report`: the HTML report of a run, opened in real headless Chromium.

Two pipeline runs (r1, r2) on one output root give every table the report reads, transitions
included; a third, small run in another root has gmm and the autoencoder switched off. The page must
load offline with no console error, exception or network request, and every figure's PNG must
decode in the browser. Chromium comes from `scripts/install_chromium.sh` (run by scripts/test.sh);
without it these tests fail, they are not skipped.
"""

from __future__ import annotations

import datetime as dt
import html
import html.parser
import json
import math
import pathlib
import shutil

import pandas as pd
import pytest

from segspark import usecases
from segspark.cli import main
from segspark.config import load_config
from segspark.io.catalog import SEGMENT_DRIFT
from segspark.io.delta import write_table
from segspark.io.tables import read_output_table, table_path
from segspark.report import write_report
from segspark.report.figures import draw_data_quality, draw_transitions, png, segment_label
from segspark.report.html import FigureBlock, Note, Section, Table, render_page

from .chromium import Chromium, find_chromium
from .conftest import FAST_MODELS, REPO, copied

CONFIG = REPO / "conf/local.yaml"
MODELS = ("kmeans", "bisecting_kmeans", "gmm", "ae_hdbscan")
SWEPT = ("kmeans", "bisecting_kmeans", "gmm")  # ae_hdbscan's k is HDBSCAN's: no sweep to draw
EXPECTED_FIGURES = [
    *[f"fig-sizes-{m}" for m in MODELS],
    *[f"fig-zscores-{m}" for m in MODELS],
    *[f"fig-top-features-{m}" for m in MODELS],
    *[f"fig-separation-{m}" for m in MODELS],
    "fig-projection-embeddings",
    *[f"fig-selection-{m}" for m in SWEPT],
    "fig-gmm-membership",
    "fig-anomaly-scores",
    *[f"fig-transitions-{m}" for m in MODELS],
    "fig-data-quality",
]
SECTIONS = ["sec-run", "sec-sizes", "sec-profiles", "sec-top-features", "sec-separation", "sec-projection",
            "sec-selection", "sec-scores", "sec-transitions", "sec-quality", "sec-drift"]

# Every figure: its id, whether its image decoded, its natural size and caption.
FIGURES_JS = """
Promise.all(Array.from(document.querySelectorAll('figure.figure')).map(f => {
  const img = f.querySelector('img');
  const caption = f.querySelector('figcaption');
  if (!img) return Promise.resolve({id: f.id, decoded: false, width: 0, height: 0, caption: ''});
  return img.decode().then(() => true, () => false).then(ok => ({
    id: f.id, decoded: ok, width: img.naturalWidth, height: img.naturalHeight,
    caption: caption ? caption.textContent : ''}));
}))
"""
PAGE_JS = """({
  sections: Array.from(document.querySelectorAll('section')).map(s => s.id),
  toc: Array.from(document.querySelectorAll('nav.toc a')).map(a => a.getAttribute('href')),
  scripts: document.querySelectorAll('script').length,
  drift: document.getElementById('sec-drift').textContent,
  transitions: document.getElementById('sec-transitions').textContent,
  scores: document.getElementById('sec-scores').textContent,
  projection: document.getElementById('sec-projection').textContent,
  title: document.title,
})"""


def config(root: pathlib.Path, events: pathlib.Path, *overrides: str):
    return load_config(CONFIG, [f"output.root={root}", f"input.path={events}", *FAST_MODELS, *overrides])


@pytest.fixture(scope="module")
def two_runs(spark, trained_run, tmp_path_factory):
    """Runs r1 then r2 of every model on the same output root (r2 has transitions from r1): a copy of
    the shared run r1 (conftest.trained_run), then r2 on it."""
    assert trained_run.exit_code == 0, trained_run.stdout
    cfg = trained_run.config(copied(trained_run.root, tmp_path_factory.mktemp("report")))
    assert usecases.run(spark, cfg, run_id="r2").status == "succeeded"
    return cfg


@pytest.fixture(scope="module")
def report(spark, two_runs):
    return write_report(spark, two_runs)


def browse(path: str, profile: pathlib.Path):
    """Open `path` in headless Chromium: (page problems, figures, page facts)."""
    if find_chromium() is None:
        pytest.fail("chromium is not installed: run `bash scripts/install_chromium.sh` "
                    "(as root on Debian/Ubuntu it installs the `chromium` package; scripts/test.sh runs it)")
    with Chromium.launch(profile) as browser:
        page = browser.open(pathlib.Path(path).resolve().as_uri())
        figures = page.evaluate(FIGURES_JS, await_promise=True)
        facts = page.evaluate(PAGE_JS)
    return page, figures, facts


def test_report_renders_in_chromium_with_every_figure_and_no_error(spark, report, two_runs, tmp_path):
    assert report.run_id == "r2"  # the latest succeeded run with segments
    assert report.path == f"{two_runs.output.root}/_reports/r2/report.html"
    assert report.figures == EXPECTED_FIGURES
    size = pathlib.Path(report.path).stat().st_size
    assert size == report.size_bytes and size < 4_000_000, f"report is {size:,} bytes"

    page, figures, facts = browse(report.path, tmp_path / "chromium")
    assert page.problems == [], "\n".join(page.problems)
    assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests
    assert [f["id"] for f in figures] == EXPECTED_FIGURES
    undecoded = [f["id"] for f in figures if not (f["decoded"] and f["width"] > 0 and f["height"] > 0)]
    assert undecoded == [], f"images that did not decode: {undecoded}"
    assert all(f["caption"].strip() for f in figures)
    assert facts["sections"] == SECTIONS
    assert facts["toc"] == [f"#{s}" for s in SECTIONS]
    assert facts["scripts"] == 0
    assert "run r2" in facts["title"]
    # No stream has run on this root: the drift section says so instead of failing.
    assert "no segment_drift table" in facts["drift"]
    assert "sec-drift" in {s.id for s in report.skipped}
    assert "r1 → r2" in facts["transitions"]
    # Every segment's name is in the page (HTML-escaped), next to its id in the segments tables.
    text = pathlib.Path(report.path).read_text()
    profiles = read_output_table(spark, two_runs.output, "segment_profiles").where("run_id = 'r2'").collect()
    missing = [(p.model, p.segment, p.segment_name) for p in profiles
               if f"<td class=\"num\">{p.segment}</td><td>{html.escape(p.segment_name)}</td>" not in text]
    assert profiles and missing == []
    # Only the sweep-less model's curve and the stream are left out, each with its reason.
    assert {s.id for s in report.skipped} == {"fig-selection-ae_hdbscan", "sec-drift"}
    assert all(s.reason for s in report.skipped)


class SectionTables(html.parser.HTMLParser):
    """caption -> rows (lists of cell texts) of the tables inside one section of the page."""

    def __init__(self, section_id: str):
        super().__init__()
        self.section_id, self.inside, self.tables = section_id, False, {}
        self.text: list[str] | None = None
        self.caption, self.row = "", None

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.inside = dict(attrs).get("id") == self.section_id
        elif self.inside and tag in ("caption", "td"):
            self.text = []
        elif self.inside and tag == "tr":
            self.row = []

    def handle_data(self, data):
        if self.text is not None:
            self.text.append(data)

    def handle_endtag(self, tag):
        if tag == "caption" and self.text is not None:
            self.caption, self.text = "".join(self.text), None
            self.tables[self.caption] = []
        elif tag == "td" and self.text is not None:
            self.row.append("".join(self.text))
            self.text = None
        elif tag == "tr" and self.row is not None:
            if self.row:
                self.tables[self.caption].append(self.row)
            self.row = None


def test_separation_section_shows_each_segments_silhouette_and_separating_features(spark, report, two_runs):
    run = read_output_table(spark, two_runs.output, "runs").where("run_id = 'r2'").collect()[0]
    metrics = json.loads(run.metrics)
    profiles = read_output_table(spark, two_runs.output, "segment_profiles").where("run_id = 'r2'").collect()
    parser = SectionTables("sec-separation")
    parser.feed(pathlib.Path(report.path).read_text())
    for model in MODELS:
        segments = sorted(p.segment for p in profiles if p.model == model)
        record = metrics[model]["separation"]
        # 400 users: the sweep's sample is every user; the silhouette's, the first 200 (FAST_MODELS).
        assert record["feature_users"] == run.users and record["silhouette_users"] == 200
        assert record["space"] == ("autoencoder embeddings" if model == "ae_hdbscan" else "prepared features")
        by_segment = {r["segment"]: r for r in record["segments"]}
        assert sorted(by_segment) == segments
        measured = {s: r for s, r in by_segment.items() if r["silhouette"] is not None}
        assert -1 not in measured and len(measured) >= 2, (model, record)
        assert all(math.isfinite(r["silhouette"]) and -1.0 <= r["silhouette"] <= 1.0 for r in measured.values())
        # The segments' means weighted by their sampled users are the model's silhouette on those users.
        weighted = sum(r["silhouette"] * r["silhouette_users"] for r in measured.values())
        assert weighted / sum(r["silhouette_users"] for r in measured.values()) == pytest.approx(record["silhouette"], abs=1e-5)
        for segment, r in measured.items():
            assert r["nearest"] in measured and r["nearest"] != segment
            assert r["versus_rest"] and r["versus_nearest"]
            assert all(math.isfinite(value) and value != 0 for _, value in r["versus_rest"] + r["versus_nearest"])

        # The page: a row per segment, its silhouette as recorded, the strongest separating feature with its sign.
        (caption,) = [c for c in parser.tables if c.startswith(f"{model}: separation per segment")]
        rows = parser.tables[caption]
        assert [int(r[0]) for r in rows] == segments
        for row in rows:
            r = by_segment[int(row[0])]
            if r["silhouette"] is None:
                assert row[3] == "—"
            else:
                assert -1.0 <= float(row[3]) <= 1.0 and float(row[3]) == pytest.approx(r["silhouette"], abs=1e-3)
            name, value = r["versus_rest"][0]
            assert row[6].startswith(f"{name} {'−' if value < 0 else '+'}{abs(value):.1f}σ")


def test_report_has_no_external_references(report):
    class Refs(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs: list[tuple[str, str, str]] = []
            self.tags: list[str] = []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.refs += [(tag, name, value or "") for name, value in attrs if name in ("src", "href", "srcset")]

    text = pathlib.Path(report.path).read_text()
    parser = Refs()
    parser.feed(text)
    assert parser.refs, "expected the figures' src attributes"
    external = [r for r in parser.refs if "http://" in r[2] or "https://" in r[2]]
    assert external == []
    assert all(value.startswith(("data:", "#")) for _, _, value in parser.refs), parser.refs
    assert "script" not in parser.tags and "@import" not in text and "url(" not in text


def test_cli_report_prints_the_path_and_notes_the_first_run_has_no_transitions(two_runs, capsys, tmp_path):
    out = tmp_path / "r1.html"
    code = main(["report", "--config", str(CONFIG), "--run-id", "r1", "--out", str(out),
                 "--set", f"output.root={two_runs.output.root}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert "left out:" in captured.out and "sec-transitions" in captured.out
    text = out.read_text()
    assert 'id="sec-transitions"' in text and "no previous successful run" in text
    assert 'id="fig-transitions-' not in text
    assert text.count('<figure class="figure"') == len(EXPECTED_FIGURES) - len(MODELS)


def test_unknown_run_id_exits_2_with_one_clear_message(two_runs, capsys):
    code = main(["report", "--config", str(CONFIG), "--run-id", "no-such-run",
                 "--set", f"output.root={two_runs.output.root}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "report: --run-id 'no-such-run' is not in the runs table" in err
    assert "latest runs: r2 (succeeded), r1 (succeeded)" in err
    assert err.count("error:") == 1 and "Traceback" not in err


def test_no_runs_exits_2(spark, capsys, tmp_path):
    code = main(["report", "--config", str(CONFIG), "--set", f"output.root={tmp_path / 'empty'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "report: no runs under output.root=" in err and "segspark run" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def small_run(spark, sample_parquet, tmp_path_factory):
    """One cheap run in its own root: kmeans alone with a fixed k (gmm and the autoencoder off)."""
    cfg = config(
        tmp_path_factory.mktemp("report-small") / "out", sample_parquet / "events",
        "models.gmm.enabled=false", "models.autoencoder.enabled=false", "models.bisecting_kmeans.enabled=false",
        "models.kmeans.k=3",
    )
    assert usecases.run(spark, cfg, run_id="small").status == "succeeded"
    return cfg


def test_disabled_models_are_notes_and_listed_as_skipped(spark, small_run, tmp_path):
    result = write_report(spark, small_run, out=str(tmp_path / "small.html"))
    assert result.run_id == "small" and result.path == str(tmp_path / "small.html")
    assert result.figures == [
        "fig-sizes-kmeans", "fig-zscores-kmeans", "fig-top-features-kmeans", "fig-separation-kmeans",
        "fig-projection-features",
        "fig-anomaly-scores", "fig-data-quality",
    ]
    skipped = {s.id: s.reason for s in result.skipped}
    assert set(skipped) == {
        "model-bisecting_kmeans", "model-gmm", "model-ae_hdbscan", "fig-projection-embeddings",
        "fig-selection-kmeans", "fig-gmm-membership", "sec-transitions", "sec-drift",
    }
    assert "model gmm was not trained" in skipped["fig-gmm-membership"]
    assert "ae_hdbscan was not trained" in skipped["fig-projection-embeddings"]
    assert "kmeans segment" in skipped["fig-projection-embeddings"]

    page, figures, facts = browse(result.path, tmp_path / "chromium")
    assert page.problems == [], "\n".join(page.problems)
    assert [f["id"] for f in figures] == result.figures
    assert all(f["decoded"] and f["width"] > 0 for f in figures)
    assert facts["sections"] == SECTIONS
    assert "No GMM membership distribution: model gmm was not trained in this run." in facts["scores"]
    assert "No projection of the autoencoder embeddings" in facts["projection"]


def test_latest_drift_rows_of_a_stream_are_shown(spark, small_run, tmp_path):
    drift = table_path(small_run.output, "segment_drift")
    at = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
    rows = [
        ("app", batch, dt.date(2026, 11, 1), "kmeans", 40, psi, '{"monetary": 0.1}', 0.2, 0.05, 0.0, retrain,
         reasons, at + dt.timedelta(minutes=batch))
        for batch, psi, retrain, reasons in [
            (0, 0.0123, False, []),
            (1, 0.41, True, ["max PSI 0.41 > 0.25 (monetary)"]),
        ]
    ]
    write_table(spark, spark.createDataFrame(rows, SEGMENT_DRIFT), drift)
    try:
        result = write_report(spark, small_run, out=str(tmp_path / "drift.html"))
    finally:
        shutil.rmtree(drift)
    assert "sec-drift" not in {s.id for s in result.skipped}
    section = pathlib.Path(result.path).read_text().split('id="sec-drift"')[1]
    # Only the latest batch of the stream's model, with its recommendation and reason.
    assert "max PSI 0.41 &gt; 0.25 (monetary)" in section and ">YES<" in section and ">0.41<" in section
    assert "0.0123" not in section


def test_figures_draw_quarantine_reasons_and_users_new_to_a_run():
    quality = png(draw_data_quality, 9_000, pd.DataFrame({"reason": ["duplicate", "missing_price"], "rows": [30, 4]}))
    flows = pd.DataFrame({"from_segment": [0, 0, 1, None, 1], "to_segment": [0, 1, 1, 0, None],
                          "users": [50, 3, 40, 7, 2]})
    moved = png(draw_transitions, flows, "kmeans", "r1", "r2", {0: "browsers", 1: "buyers"}, {0: "browsers"})
    for image in (quality, moved):
        assert image.startswith(b"\x89PNG") and 2_000 < len(image) < 400_000


def test_text_from_tables_is_escaped_in_the_page_and_literal_in_figures():
    hostile = '<script>alert("x")</script> & $x$'
    page = render_page(
        hostile, hostile,
        [Section("sec-a", hostile, [Note(hostile), Table([hostile], [[hostile]]),
                                    FigureBlock("fig-a", b"\x89PNG", hostile, hostile)])],
        generated_at=dt.datetime(2026, 1, 1),
    )
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; $x$" in page
    assert segment_label(1, "cheap $ buyers") == r"1 · cheap \$ buyers"
