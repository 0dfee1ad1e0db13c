"""Writing one small file (a report) next to the output tables: a local path or a file-system URI.

Local paths (and `file:` URIs; `dbfs:/x` as the driver's `/dbfs/x`) are written with the standard
library, creating the folders; other URIs (`s3://`, `gs://`, `abfss://`, `hdfs://`, ...) go through
pyarrow's file systems. A local file is written under a temporary name and then moved into place,
so that a reader never sees half of it (on object stores the final write is atomic anyway).
"""

from __future__ import annotations

import logging
import pathlib
import uuid
from urllib.parse import unquote, urlparse

log = logging.getLogger(__name__)


def path_exists(path: str) -> bool:
    """Whether a file or folder is at `path` (a local path, file: URI or file-system URI)."""
    local = local_path(path)
    if local is not None:
        return local.exists()
    import pyarrow.fs as pafs

    fs, inner = pafs.FileSystem.from_uri(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def local_path(path: str) -> pathlib.Path | None:
    """The local file-system path of `path` (a plain path, a file: URI, dbfs:/ as /dbfs), else None."""
    parsed = urlparse(path)
    if parsed.scheme == "dbfs":  # Databricks: DBFS is mounted on the driver at /dbfs
        parsed = urlparse("file:///dbfs/" + (parsed.netloc + parsed.path).lstrip("/"))
    if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # one letter: a Windows drive
        return pathlib.Path(unquote(parsed.path) if parsed.scheme == "file" else path)
    return None


def write_text_file(path: str, text: str) -> int:
    """Write `text` (UTF-8) to `path`, replacing an existing file; returns the number of bytes."""
    data = text.encode("utf-8")
    local = local_path(path)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            partial.write_bytes(data)
            partial.replace(local)
        finally:
            partial.unlink(missing_ok=True)
    else:
        import pyarrow.fs as pafs

        fs, inner = pafs.FileSystem.from_uri(path)
        parent = inner.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(inner) as stream:
            stream.write(data)
    log.debug("wrote %s (%d bytes)", path, len(data))
    return len(data)
