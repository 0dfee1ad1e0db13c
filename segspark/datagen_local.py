"""`segspark generate` for a sample the driver can hold: the same files, written without Spark.

A Spark job pays for a JVM and for Python workers before its first row: `segspark generate` of the
demo's 5,000 users took 16.6 s, of which drawing its 291k events took 0.3 s. A sample of up to
DRIVER_MAX_USERS users on a local path is therefore drawn here, block by block from datagen's own
blocks and seeds, and written with pyarrow as the Spark job writes it: one file per partition of the
blocks (GenerateSpec.num_partitions, spark.range's contiguous slices), the same rows in the same
order, the same schema, and `_SUCCESS` in each folder when it is complete. A test reads both writers'
output and finds the same records. Larger samples, other file systems and jobs keep the Spark path
(`datagen.write_dataset`).
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import StructType

from segspark.datagen import (
    TRUTH_SCHEMA,
    GenerateSpec,
    block_lines,
    block_truth,
    check_request,
    csv_header,
    generate_block,
    log_start,
    partition_blocks,
    summarise,
)
from segspark.io.files import local_path

# About 5.8M events (~5 s to draw on one core): beyond it the Spark job's two cores win back its start.
DRIVER_MAX_USERS = 100_000


def writes_on_driver(spec: GenerateSpec, out_dir: str) -> bool:
    """Whether this sample is small enough for the driver and goes to a local path."""
    return spec.users <= DRIVER_MAX_USERS and urlparse(out_dir).scheme in ("", "file")


def write_dataset_on_driver(spec: GenerateSpec, out_dir: str, fmt: str = "parquet", *, overwrite: bool = False) -> dict:
    """`datagen.write_dataset` without Spark: out_dir/events/ and out_dir/truth/, and the same summary."""
    check_request(spec, out_dir, fmt, overwrite)
    root = local_path(out_dir)
    log_start(spec, str(root), fmt)
    events_dir, truth_dir = root / "events", root / "truth"
    for folder in (events_dir, truth_dir):  # as Spark's overwrite mode: the folder is replaced
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    events, personas = 0, collections.Counter()
    # A file for every partition, an empty one too, as the Spark job writes (a csv file then holds its header).
    for part, blocks in enumerate(partition_blocks(spec)):
        name = f"part-{part:05d}"
        if fmt == "parquet":
            records = _frame([generate_block(spec, block) for block in blocks], spec.schema)
            _write_parquet(records, spec.schema, events_dir / f"{name}.snappy.parquet")
            events += len(records)
        else:
            lines = [csv_header(spec)] if fmt == "csv" else []
            for block in blocks:
                lines.extend(block_lines(spec, block, fmt))
            (events_dir / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        truth = _frame([block_truth(spec, block) for block in blocks], TRUTH_SCHEMA)
        _write_parquet(truth, TRUTH_SCHEMA, truth_dir / f"{name}.snappy.parquet")
        personas.update(truth["persona"].tolist())
    for folder in (events_dir, truth_dir):
        (folder / "_SUCCESS").touch()
    return summarise(spec, fmt, dict(personas), events if fmt == "parquet" else None)


def _frame(blocks: list[pd.DataFrame], schema: StructType) -> pd.DataFrame:
    if not blocks:
        return pd.DataFrame({name: pd.Series([], dtype=object) for name in schema.fieldNames()})
    return pd.concat(blocks, ignore_index=True)


def _write_parquet(frame: pd.DataFrame, schema: StructType, path: Path) -> None:
    # The Spark schema's Arrow form (types and nullability), so that a reader sees what Spark wrote.
    arrow_schema = to_arrow_schema(schema)
    table = pa.Table.from_pandas(frame[arrow_schema.names], schema=arrow_schema, preserve_index=False)
    pq.write_table(table, path, compression="snappy")

