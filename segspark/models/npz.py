"""Opening the models' `.npz` files (encoder weights, HDBSCAN artifact) from a path or from bytes.

Never with pickle: a model file, or bytes shipped in a Spark closure, can only hold arrays.
"""

from __future__ import annotations

import io
import os

import numpy as np


def open_npz(source: str | os.PathLike[str] | bytes):
    """np.load(..., allow_pickle=False) of a file or of in-memory bytes; use it as a context manager."""
    return np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
