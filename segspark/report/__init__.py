"""The HTML report of a run (`segspark report`): one self-contained file, figures embedded.

    from segspark.report import write_report
    result = write_report(spark, cfg)            # the latest succeeded run with segments
    print(result.path, result.figures, result.skipped)

Modules: `data` (the run's tables as small pandas frames: aggregates and a bounded sample),
`projection` (2-D PCA of the sample), `figures` (matplotlib, Agg, PNG), `html` (the page),
`sections` (what each section shows, and the notes for what it cannot), `writer` (`write_report`).
"""

from segspark.report.sections import Skipped
from segspark.report.writer import ReportResult, default_path, write_report

__all__ = ["ReportResult", "Skipped", "default_path", "write_report"]
