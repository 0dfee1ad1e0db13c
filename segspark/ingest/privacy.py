"""Pseudonymised user ids: a keyed HMAC-SHA256 computed by Spark, with the key kept out of config.

With `privacy.pseudonymise_user_id`, ingest replaces every user id by HMAC-SHA256(key, id) in lower-case
hex before anything is stored, so features, segments, embeddings, quarantine rows and the stream's
state all hold the pseudonym; the same key gives the same pseudonym in every run, score and stream.

Why it looks like this:
- HMAC, not a plain hash: user ids are few and guessable (numbers, e-mails), so sha2(id) is reversed by
  hashing every candidate. Without the key, a pseudonym cannot be linked back to its id.
- The HMAC is Spark expressions (RFC 2104 with the key's inner and outer pads computed on the driver:
  sha2(opad || unhex(sha2(ipad || id)))), so no Python runs per row and it works over Spark Connect.
- The key comes from an environment variable (`privacy.key_env`) or a Databricks secret scope, never
  from a config file, which gets committed, logged and copied. Its text is used as UTF-8 bytes; keys
  shorter than MIN_KEY_BYTES are refused (a short key can be guessed, and with it every id).
- `pseudonym_of` is the same function in Python (hmac.new), for finding a known user's rows.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column
from pyspark.sql import functions as F

from segspark.config import PrivacyConfig
from segspark.errors import UsageError

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
ALGORITHM = "hmac-sha256"
_BLOCK = 64  # SHA-256's block size in bytes (RFC 2104's B)


@dataclass(frozen=True)
class Protection:
    """What ingest applies: the pseudonym key (None: ids stay as they are) and the quarantine raw mode."""

    pseudonym_key: bytes | None = None
    quarantine_raw: str = "full"

    def describe(self) -> dict[str, Any]:
        """For runs.metrics and the bundle: how ids were stored (a key check, never the key)."""
        if self.pseudonym_key is None:
            return {"user_id": "as in the source", "quarantine_raw": self.quarantine_raw}
        return {"user_id": ALGORITHM, "key_check": key_check(self.pseudonym_key), "quarantine_raw": self.quarantine_raw}


def resolve_protection(privacy: PrivacyConfig, spark=None) -> Protection:
    """The Protection for `privacy`, reading the key when pseudonymisation is on. UsageError (exit 2)
    when the key is missing or too short."""
    if not privacy.pseudonymise_user_id:
        return Protection(None, privacy.quarantine_raw)
    return Protection(_read_key(privacy, spark), privacy.quarantine_raw)


def check_same_pseudonyms(trained: dict | None, now: dict | None, bundle: str) -> None:
    """Warn when ids are stored otherwise than in the bundle's training run (another key, or pseudonyms
    on one side only): the same user then has different ids in the two, and rows do not match."""
    if not trained or not now or trained.get("key_check") == now.get("key_check"):
        return

    def how(entry: dict) -> str:
        return f"pseudonymised (key check {entry['key_check']})" if entry.get("key_check") else "not pseudonymised"

    log.warning("user ids here are %s but those of bundle %s's training run were %s: the same user has different "
                "ids in the two", how(now), bundle, how(trained))


def check_key_before_spark(privacy: PrivacyConfig) -> None:
    """UsageError (exit 2) now, before a SparkSession starts, when pseudonymisation is on and the key's
    environment variable is missing or too short: the CLI's one-line error in about a second, not
    after a JVM started and a run began. A key from a Databricks secret scope needs the session's
    dbutils, so that one is read when the run starts."""
    if privacy.pseudonymise_user_id and privacy.secret_scope is None:
        _read_key(privacy, None, announce=False)


def _read_key(privacy: PrivacyConfig, spark, announce: bool = True) -> bytes:
    text, source = None, None
    if privacy.secret_scope is not None:
        dbutils = _dbutils(spark)
        if dbutils is not None:
            source = f"secret {privacy.secret_key!r} of Databricks secret scope {privacy.secret_scope!r}"
            try:
                text = dbutils.secrets.get(scope=privacy.secret_scope, key=privacy.secret_key)
            except Exception as exc:  # noqa: BLE001 - dbutils raises its own exception types
                raise UsageError(f"privacy.pseudonymise_user_id is on but the {source} cannot be read: "
                                 f"{type(exc).__name__}") from None
    if text is None:
        source = f"environment variable {privacy.key_env}"
        text = os.environ.get(privacy.key_env)
    if not text:
        scope = (f" (or the Databricks secret {privacy.secret_scope}/{privacy.secret_key}, but dbutils is not "
                 "available here)" if privacy.secret_scope is not None else "")
        raise UsageError(
            f"privacy.pseudonymise_user_id is on but no key is set: set the environment variable "
            f"{privacy.key_env}{scope} to a secret of at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 32`), "
            "the same for every run whose ids must match; the key never goes in a config file"
        )
    key = text.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise UsageError(f"the pseudonym key in the {source} has {len(key)} bytes; use at least {MIN_KEY_BYTES} "
                         "(e.g. `openssl rand -hex 32`): a short key can be guessed, and with it every user id")
    if announce:
        log.info("user ids are pseudonymised (%s, key from the %s, key check %s)", ALGORITHM, source, key_check(key))
    return key


def _dbutils(spark):
    """Databricks' dbutils: the notebook's, else the runtime's DBUtils for this session; None elsewhere."""
    try:
        from IPython import get_ipython  # notebooks define `dbutils` in the user namespace

        shell = get_ipython()
        if shell is not None and "dbutils" in shell.user_ns:
            return shell.user_ns["dbutils"]
    except ImportError:
        pass
    if spark is None:
        return None
    try:
        from pyspark.dbutils import DBUtils  # only in Databricks runtimes
    except ImportError:
        return None
    return DBUtils(spark)


def _pads(key: bytes) -> tuple[bytes, bytes]:
    """RFC 2104: the key (hashed when longer than a block) padded to a block, xor 0x36 and xor 0x5c."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def pseudonym(user_id: Column, key: bytes) -> Column:
    """HMAC-SHA256(key, UTF-8 of user_id) as lower-case hex, in Spark expressions (null stays null)."""
    inner_pad, outer_pad = _pads(key)
    # Binary literals through unhex: the same plan on classic Spark and Spark Connect.
    inner = F.unhex(F.sha2(F.concat(F.unhex(F.lit(inner_pad.hex())), F.encode(user_id, "UTF-8")), 256))
    return F.sha2(F.concat(F.unhex(F.lit(outer_pad.hex())), inner), 256)


def pseudonym_of(user_id: str, key: bytes) -> str:
    """The pseudonym ingest gives `user_id` (after its normalisation: "17850.0" is stored as "17850")."""
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()


def key_check(key: bytes) -> str:
    """A short fingerprint of the key (an HMAC of a fixed text): equal checks, equal pseudonyms."""
    return hmac.new(key, b"segspark pseudonym key check", hashlib.sha256).hexdigest()[:12]


__all__ = ["Protection", "check_key_before_spark", "check_same_pseudonyms", "key_check", "pseudonym", "pseudonym_of", "resolve_protection"]
