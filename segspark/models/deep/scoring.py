"""Applying the deep model to every user on the executors: embeddings and HDBSCAN segments.

`deep_scores` runs one `mapInArrow` over the prepared vectors. Each Python worker decodes the
encoder and the slim HDBSCAN artifact once (a per-process cache keyed by their sha256) and then
works on whole Arrow batches: the batch's feature lists become one contiguous float32 matrix
without a per-row copy, the encoder is a numpy forward pass, and HDBSCAN prediction is vectorised
over the batch.

The model bytes travel inside the function closure rather than through `sc.broadcast`, so the same
code works where no SparkContext exists (Spark Connect, Databricks serverless and shared clusters).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    FloatType,
    IntegerType,
    StringType,
    StructField,
    StructType,
)
from threadpoolctl import threadpool_limits

FEATURES_ARRAY = "_features"

DEEP_SCORES = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("embedding", ArrayType(FloatType(), False), False),
        StructField("segment", IntegerType(), False),
        StructField("probability", DoubleType(), False),
        StructField("anomaly_score", DoubleType(), True),
    ]
)

# Per Python worker: decoded models by the sha256 of their bytes. Spark reuses Python workers
# between tasks (spark.python.worker.reuse, on by default), so a model is decoded once per worker.
_WORKER_CACHE: dict[str, object] = {}
_CACHE_LIMIT = 4  # models of a few runs at most; older ones are dropped


def cached_model(payload: bytes, key: str, decode: Callable[[bytes], object]) -> object:
    model = _WORKER_CACHE.get(key)
    if model is None:
        if len(_WORKER_CACHE) >= _CACHE_LIMIT:
            _WORKER_CACHE.pop(next(iter(_WORKER_CACHE)))
        model = _WORKER_CACHE[key] = decode(payload)
    return model


def matrix_from_lists(column: pa.Array, width: int) -> np.ndarray:
    """A (rows x width) float32 matrix from an Arrow list<float> column, without a per-row copy."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.flatten().to_numpy(zero_copy_only=False)
    rows = len(column)
    if values.size != rows * width:
        raise ValueError(
            f"prepared feature vectors: expected {width} values per user, found {values.size} for {rows} users"
        )
    return values.reshape(rows, width).astype(np.float32, copy=False)


def deep_scores(prepared: DataFrame, encoder, density) -> DataFrame:
    """user_id, embedding, segment (-1 = noise), probability (membership strength), anomaly_score
    (GLOSH outlier score) for every row of `prepared` (user_id + the prepared vector).

    encoder: segspark.models.deep.encoder.NumpyEncoder; density: segspark.models.deep.density.SlimHdbscan."""
    # Imported here, on the driver: a Python worker unpickling `score` imports this module, and
    # pyspark.ml and the preparation's module (pydantic's config with it) would cost it 0.3 s.
    from pyspark.ml.functions import vector_to_array

    from segspark.models.deep.density import SlimHdbscan
    from segspark.models.deep.encoder import NumpyEncoder
    from segspark.models.prepare import PREPARED_VECTOR

    encoder_bytes, density_bytes = encoder.to_bytes(), density.to_bytes()
    encoder_key = "encoder:" + hashlib.sha256(encoder_bytes).hexdigest()
    density_key = "hdbscan:" + hashlib.sha256(density_bytes).hexdigest()
    width = encoder.input_dim

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        enc = cached_model(encoder_bytes, encoder_key, NumpyEncoder.from_bytes)
        dens = cached_model(density_bytes, density_key, SlimHdbscan.from_bytes)
        # One task per core: BLAS threads of their own would oversubscribe the executor's cores
        # (measured 3-6x slower than one thread when every core runs a task).
        with threadpool_limits(1):
            yield from _score_batches(batches, enc, dens, width)

    frame = prepared.select(
        F.col("user_id").cast("string").alias("user_id"),
        vector_to_array(F.col(PREPARED_VECTOR), "float32").alias(FEATURES_ARRAY),
    )
    return frame.mapInArrow(score, DEEP_SCORES)


def _score_batches(batches: Iterator[pa.RecordBatch], encoder, density, width: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        x = matrix_from_lists(batch.column(FEATURES_ARRAY), width)
        embedding = encoder.encode(x).astype(np.float32, copy=False)
        labels, probabilities, outlier_scores = density.assign(embedding)
        dims = embedding.shape[1]
        offsets = pa.array(np.arange(0, (len(x) + 1) * dims, dims, dtype=np.int32))
        yield pa.RecordBatch.from_arrays(
            [
                batch.column("user_id"),
                pa.ListArray.from_arrays(offsets, pa.array(embedding.reshape(-1), type=pa.float32())),
                pa.array(labels.astype(np.int32, copy=False)),
                pa.array(probabilities.astype(np.float64, copy=False)),
                # hdbscan gives NaN GLOSH scores inside a cluster of more than min_samples identical
                # points (infinite density): null in the table, and never flagged.
                pa.array(outlier_scores.astype(np.float64, copy=False), mask=np.isnan(outlier_scores)),
            ],
            schema=_ARROW_SCHEMA,
        )


_ARROW_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), False),
        pa.field("embedding", pa.list_(pa.field("element", pa.float32(), False)), False),
        pa.field("segment", pa.int32(), False),
        pa.field("probability", pa.float64(), False),
        pa.field("anomaly_score", pa.float64(), True),
    ]
)
