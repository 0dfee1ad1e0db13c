"""A class-data-sharing archive of Spark's classes for the suite's JVMs (test-only; segspark sets none).

The suite starts about forty JVMs (CLI and spark-submit runs, a Connect server, cluster daemons and
executors, the test processes' own two), and each loads some 20,000 classes from Spark's jars before
it computes anything. A dynamic CDS archive (JDK 13+: `-XX:ArchiveClassesAtExit` once, then
`-XX:SharedArchiveFile`) maps the parsed and verified classes of one representative run instead. A
small Spark program (local[2]: a groupBy, a Parquet write and read) took 11.7, 13.1 and 12.7 busy
cpu-s without it and 9.2, 7.7 and 8.4 with it, alternated, and 15,170 of its 20,640 classes came from
the archive, with the serial, parallel and G1 collectors and heaps of 1 to 10 GB alike.

The archive is built once per JDK, pyspark and set of jars (`key`), under build/jvm-archive/, by
`jvm_archive_workload.py`: a few seconds of the operations the tests use (SQL, windows,
higher-order functions, files, Python workers, MLlib, a file stream). A JVM whose class path or JDK
does not match it ignores it and loads its classes as before (`-Xshare:auto`, the default); its
messages are switched off, so no JVM prints anything more. SEGSPARK_TEST_JVM_ARCHIVE=off runs the
suite without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "build" / "jvm-archive"
WORKLOAD = Path(__file__).with_name("jvm_archive_workload.py")
SETTING = "SEGSPARK_TEST_JVM_ARCHIVE"  # the archive's path (set by the run's first process), or "off"


def _key() -> str:
    """What the archive depends on: the JDK's build, pyspark's version and its jars (name and size)."""
    from pyspark.find_spark_home import _find_spark_home

    java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60).stderr
    jars = sorted((p.name, p.stat().st_size) for p in (Path(_find_spark_home()) / "jars").glob("*.jar"))
    return hashlib.sha256(repr((java, jars)).encode()).hexdigest()[:16]


def options() -> str:
    """The JVM options that map the archive (none when it is switched off). The path may not exist
    yet: a JVM that starts before the build finished loads its classes as before."""
    path = os.environ.get(SETTING, "")
    if not path or path == "off":
        return ""
    return f"-XX:SharedArchiveFile={path} -Xlog:cds=off -Xlog:cds+dynamic=off"


def start(jvm_options: str) -> subprocess.Popen | None:
    """Publish the archive's path in SETTING (for this process and the ones it starts) and, unless it
    exists, build it in the background with the options `jvm_options` of the suite's short-lived JVMs.
    The build (about 45 s, most of it the JVM writing the archive as it exits) runs beside the first
    tests instead of before them; the JVMs started after it finished map the archive. Returns the
    builder, or None. A failed build leaves the suite as it was without the archive."""
    if os.environ.get(SETTING) == "off":
        return None
    try:
        FOLDER.mkdir(parents=True, exist_ok=True)
        archive = FOLDER / f"spark-{_key()}.jsa"
    except (OSError, subprocess.SubprocessError) as error:
        print(f"jvm_archive: none ({error}); the suite runs without it", file=sys.stderr)
        os.environ[SETTING] = "off"
        return None
    os.environ[SETTING] = str(archive)
    if archive.is_file():
        return None
    env = {**os.environ, "SPARK_SUBMIT_OPTS": jvm_options}
    env.pop(SETTING)
    return subprocess.Popen([sys.executable, __file__, str(archive)], env=env, stdout=subprocess.DEVNULL,
                            stderr=open(FOLDER / "build.log", "w"), start_new_session=True)


def stop(builder: subprocess.Popen | None) -> None:
    """End a build that is still running when the run ends (a short run: the next one builds again)."""
    if builder is not None and builder.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(builder.pid, signal.SIGKILL)
        builder.wait()


def _build(archive: Path) -> int:
    """Run the workload with -XX:ArchiveClassesAtExit under a lock (one build per archive, also for
    runs started at once), then move the archive into place in one step."""
    FOLDER.mkdir(parents=True, exist_ok=True)
    with open(FOLDER / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if archive.is_file():
            return 0
        partial = archive.with_suffix(".partial")
        partial.unlink(missing_ok=True)
        env = {**os.environ, "SPARK_SUBMIT_OPTS": f"{os.environ.get('SPARK_SUBMIT_OPTS', '')} "
                                                  f"-XX:ArchiveClassesAtExit={partial}"}
        done = subprocess.run([sys.executable, str(WORKLOAD)], env=env, timeout=600)
        if done.returncode != 0 or not partial.is_file():
            print(f"jvm_archive: not built (exit {done.returncode})", file=sys.stderr)
            return 1
        partial.rename(archive)
    return 0


if __name__ == "__main__":
    sys.exit(_build(Path(sys.argv[1])))
