"""Ingest: source records -> typed canonical events, with every bad record tagged with a reason.

`tag_events` maps the source through the config's column mapping and types every value; a record
that cannot become a valid event gets a `_reason` (the first rule it breaks, in the order of
REASONS). Exact duplicates of a valid record are tagged `duplicate` (the first copy stays clean).
Nothing is dropped: `clean_events` and `quarantine_rows` split the tagged frame, so
input rows = clean rows + quarantined rows by construction.

Exact duplicates are found within each user's events (window partitioned by user, ordered by event
time and a fingerprint of the source record, comparing each row with the one before). Partitioning
by user is the same shuffle the feature stage needs, so de-duplication costs no extra exchange.
"""

from __future__ import annotations

import datetime as dt
import string

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BooleanType,
    DateType,
    IntegralType,
    NumericType,
    StringType,
    TimestampNTZType,
    TimestampType,
)

from segspark.config import InputConfig
from segspark.ingest.privacy import Protection, pseudonym
from segspark.io.catalog import EVENT_COLUMNS
from segspark.io.readers import CORRUPT_COLUMN
from segspark.runtime.redaction import redact_text

REASON = "_reason"
# Timestamp patterns that Spark's cast to timestamp parses (ISO-8601 family).
ISO_TIMESTAMP_FORMATS = ("yyyy-MM-dd HH:mm:ss", "yyyy-MM-dd'T'HH:mm:ss", "yyyy-MM-dd HH:mm:ss.SSS")
# The REES46 exports' pattern (conf/clickstream.yaml): its UTC values skip the pattern (_utc_suffixed_time).
UTC_SUFFIXED_FORMAT = "yyyy-MM-dd HH:mm:ss z"
RAW = "_raw"
_FP64, _FP32 = "_fp64", "_fp32"  # fingerprints of the whole source record
_DUP = "_duplicate"
# The typed values the rules read (tag_events)
_ID, _SOURCE_TYPE = "_id", "_source_type"
_TIME_PRESENT, _PRICE_PRESENT, _QUANTITY_PRESENT = "_time_present", "_price_present", "_quantity_present"

# Reason codes, in the order they are checked (a record gets the first it breaks). The one list:
# README's "Quarantine reasons" documents each, and a test keeps the two in step.
REASONS = (
    "malformed_record",  # the line could not be parsed as a record at all (json/csv)
    "missing_user_id",
    "missing_event_time",
    "unparseable_timestamp",  # present but not in input.timestamp_format
    "implausible_timestamp",  # before input.plausible_time.earliest, or too far after the run's start
    "unknown_event_type",  # not a key of input.event_types
    "unparseable_price",  # not a number, or NaN / +-Infinity
    "negative_price",
    "implausible_price",  # outside input.price_bounds (1e308 is a number, not a price)
    "missing_price",  # a purchase or return without a price
    "zero_price",  # a purchase or return at price 0: no revenue (free samples, manual adjustments)
    "unparseable_quantity",  # missing, not a number, or NaN / +-Infinity
    "implausible_quantity",  # outside input.quantity_bounds
    "duplicate",  # an exact copy of an earlier record (all source columns equal); raw = canonical JSON
)


class _Source:
    """The source columns under private names (`_src0`, `_src1`, ...), so that a source column
    called like a canonical one (user_id, price) never clashes with the typed column."""

    def __init__(self, raw: DataFrame):
        self.names = list(raw.columns)
        self.alias = {name: f"_src{i}" for i, name in enumerate(self.names)}
        self.types = {field.name: field.dataType for field in raw.schema.fields}
        self.df = raw.select(*[F.col(f"`{name}`").alias(self.alias[name]) for name in self.names])

    def col(self, name: str) -> Column:
        return F.col(self.alias[name])

    def text(self, name: str | None) -> Column:
        """A source column as trimmed text, empty text as null (numbers just become text)."""
        if name is None:
            return F.lit(None).cast(StringType())
        if isinstance(self.types[name], (NumericType, BooleanType)):
            return self.col(name).cast(StringType())
        value = F.trim(self.col(name).cast(StringType()))
        return F.when(value == "", None).otherwise(value)

    def number(self, name: str | None) -> tuple[Column, Column]:
        """(value as double, whether a value was present). NaN and infinities (the text `NaN`,
        `Infinity`, `1e999`, or a double column holding them) become null: they are no value."""
        if name is None:
            return F.lit(None).cast("double"), F.lit(False)
        if isinstance(self.types[name], NumericType):
            value, present = self.col(name).cast("double"), self.col(name).isNotNull()
        else:
            text = self.text(name)
            value, present = text.try_cast("double"), text.isNotNull()
        finite = ~F.isnan(value) & (F.abs(value) != F.lit(float("inf")))
        return F.when(finite, value), present


def _user_id(src: _Source, name: str) -> Column:
    # Numeric ids exported through floats arrive as "17850.0": the ".0" is not part of the id.
    # (The cheap suffix test spares the regular expression on every other row.)
    if isinstance(src.types[name], IntegralType):
        return src.col(name).cast(StringType())
    value = src.text(name)
    return F.when(value.endswith(".0"), F.regexp_replace(value, r"^(\d+)\.0+$", "$1")).otherwise(value)


def _event_time(src: _Source, cfg: InputConfig) -> tuple[Column, Column]:
    """(parsed UTC timestamp, whether the source had a value at all)."""
    name = cfg.columns.event_time
    dtype = src.types[name]
    if isinstance(dtype, TimestampType):
        parsed = src.col(name)  # already an instant
        present = parsed.isNotNull()
    elif isinstance(dtype, (TimestampNTZType, DateType)):
        parsed = F.to_utc_timestamp(src.col(name).cast(TimestampType()), cfg.time_zone)
        present = src.col(name).isNotNull()
    else:
        text = src.text(name)
        # The session time zone is UTC, so the parsed wall-clock time is read in UTC and then moved
        # from the source's zone to UTC.
        if cfg.timestamp_format in ISO_TIMESTAMP_FORMATS:
            # Spark's own timestamp cast reads ISO-8601 text (with an optional zone) about four
            # times faster than a pattern; it accepts the whole ISO family, not only this pattern.
            local = text.try_cast(TimestampType())
        elif cfg.timestamp_format == UTC_SUFFIXED_FORMAT:
            local = _utc_suffixed_time(text)
        else:
            local = F.try_to_timestamp(text, F.lit(cfg.timestamp_format))
        parsed = local if cfg.time_zone == "UTC" else F.to_utc_timestamp(local, cfg.time_zone)
        present = text.isNotNull()
    return parsed, present


def _utc_suffixed_time(text: Column) -> Column:
    """`yyyy-MM-dd HH:mm:ss z` text (REES46's "2019-10-01 00:00:03 UTC"), parsed as the pattern would.

    The pattern's formatter costs about as much per row as reading the CSV line (11.7M events: 10-11 s
    against 6 s to read them). A value of exactly that shape in UTC (separators where the pattern puts
    them, so each field has its fixed width) is the timestamp cast of its first 19 characters, which
    reads it as the pattern does and refuses the same impossible dates and times; any other value
    (another zone, another shape) still goes through the pattern.

    The shape is one LIKE (each `_` one character): Spark matches it with one compiled regular
    expression, where the same test written as five one-character substrings, a length and a suffix
    built a string per check (11.7M events of REES46 CSV, the event time alone: 0.9 s above reading
    it, against 2.0 s)."""
    utc_shape = text.like("____-__-__ __:__:__ UTC")
    return F.when(utc_shape, F.substring(text, 1, 19).try_cast(TimestampType())).otherwise(
        F.try_to_timestamp(text, F.lit(UTC_SUFFIXED_FORMAT)))


def _event_type(src: _Source, cfg: InputConfig) -> Column:
    if cfg.columns.event_type is None:
        return F.lit(cfg.default_event_type)
    pairs = sorted((source.lower(), target) for source, target in cfg.event_types.items())
    mapping = F.create_map(*[F.lit(x) for pair in pairs for x in pair])
    text = src.text(cfg.columns.event_type)
    # The keys are lower case, and most sources write their types that way: the value itself is
    # looked up first, and lowered only when that misses (coalesce evaluates its second argument only
    # for a null first). A value that is a key is its own lower case, so the result is the same. The
    # lowering cost 1.4 s of the 10.4 s that typing 11.7M events took (translate's per-character map).
    return F.coalesce(F.element_at(mapping, text), F.element_at(mapping, _lower(text)))


def _lower(text: Column) -> Column:
    """`lower(text)`, with ASCII text lowered by a 26-letter map. Spark's lower() maps case through
    ICU (spark.sql.icu.caseMappings.enabled), whose case tables are built on its first use in each
    JVM: 1.4-1.8 s for a first lower() alone, and a cold `segspark features` of 400 users ingested in
    5.8-6.0 s instead of 6.2-6.3. For ASCII both give the same letters. A value is ASCII when its
    UTF-8 bytes are as many as its characters; any other value still goes through lower()."""
    ascii_only = F.length(text) == F.octet_length(text)
    return F.when(ascii_only, F.translate(text, string.ascii_uppercase, string.ascii_lowercase)).otherwise(F.lower(text))


def _outside(value: Column, bounds: list[float]) -> Column:
    return (value < F.lit(bounds[0])) | (value > F.lit(bounds[1]))


def _implausible_time(event_time: Column, cfg: InputConfig, now: dt.datetime) -> Column:
    """Outside input.plausible_time: before `earliest` (UTC) or more than max_future_hours after `now`."""
    window = cfg.plausible_time
    outside = F.lit(False)
    if window.earliest is not None:
        outside = outside | (event_time < F.lit(dt.datetime.combine(window.earliest, dt.time(), tzinfo=dt.UTC)))
    if window.max_future_hours is not None:
        # Rounded up to the whole minute: Spark writes a timestamp literal into the generated code,
        # so a new cut-off gave every stream micro-batch a fresh compile of its typing and rules (two
        # 60k-character classes); batches within a minute now share them. Never stricter than the
        # exact bound: a record it accepts is accepted.
        cutoff = now + dt.timedelta(hours=window.max_future_hours)
        cutoff += (dt.datetime.min.replace(tzinfo=cutoff.tzinfo) - cutoff) % dt.timedelta(minutes=1)
        outside = outside | (event_time > F.lit(cutoff))
    return outside


def tag_events(
    raw: DataFrame, cfg: InputConfig, protection: Protection | None = None, now: dt.datetime | None = None
) -> DataFrame:
    """Canonical event columns plus `_reason` (null when clean) and `_raw` (set when not clean).

    protection (privacy.py): with a pseudonym key, user_id is the id's HMAC from here on (the rules
    see the id itself, so a missing id is still `missing_user_id`), and `_raw` holds the pseudonym in
    the id's source column. Its quarantine_raw mode says what `_raw` keeps: `full` the source record
    (a line that is no record as its text, unless ids are pseudonymised: the id in it cannot be
    found), `mapped` the mapped source columns only, `none` nothing.
    `now`: the run's start (aware; default the current time), the reference of
    input.plausible_time.max_future_hours.

    Every canonical column is typed before the shuffle by user, and only those narrow typed columns
    cross it, with a 96-bit fingerprint of the whole source record (xxhash64 + murmur3) standing in
    for the source columns in the duplicate check. The output is partitioned by user and sorted by
    (user, event time): the order the feature stage's windows and aggregations need.
    """
    cols = cfg.columns
    src = _Source(raw)
    protection = protection or Protection()
    now = now or dt.datetime.now(dt.UTC)
    c = F.col

    # Typing and rules in separate projections: every source value is typed once (below), and the rules then read
    # the typed columns. Written as one expression, each rule repeats the typing it depends on (the
    # timestamp parse four times, the event-type map four times), and the generated method grows
    # past the 8,000 bytes of bytecode that the JVM compiles: it then runs interpreted, about 40x
    # slower (10M events: 118 s to type them, against 3 s for the timestamp parse alone).
    event_time, time_present = _event_time(src, cfg)
    price, price_present = src.number(cols.price)
    if cols.quantity is None:
        quantity, quantity_present = F.lit(1.0), F.lit(True)
    else:
        quantity, quantity_present = src.number(cols.quantity)
    source_cols = [src.col(name) for name in src.names]
    typed = src.df.select(
        *source_cols,  # for `_raw` of a rejected record
        _user_id(src, cols.user_id).alias(_ID),
        event_time.alias("event_time"),
        time_present.alias(_TIME_PRESENT),
        _event_type(src, cfg).alias(_SOURCE_TYPE),
        src.text(cols.item_id).alias("item_id"),
        src.text(cols.category).alias("category"),
        price.alias("price"),
        price_present.alias(_PRICE_PRESENT),
        quantity.alias("quantity"),
        quantity_present.alias(_QUANTITY_PRESENT),
        src.text(cols.session_id).alias("session_id"),
        src.text(cols.order_id).alias("order_id"),
        src.text(cols.country).alias("country"),
        src.text(cols.device).alias("device"),
        F.xxhash64(*source_cols).alias(_FP64),
        F.hash(*source_cols).alias(_FP32),
    )

    user_id, event_time, price, quantity = c(_ID), c("event_time"), c("price"), c("quantity")
    # A purchase line with a negative quantity is a return (invoice cancellations, credit notes).
    source_type = c(_SOURCE_TYPE)
    event_type = F.when((source_type == "purchase") & (quantity < 0), F.lit("return")).otherwise(source_type)
    key = protection.pseudonym_key
    stored_id = user_id if key is None else pseudonym(user_id, key)
    priced = event_type.isin("purchase", "return")
    rules = {
        "malformed_record": src.col(CORRUPT_COLUMN).isNotNull(),
        "missing_user_id": user_id.isNull(),
        "missing_event_time": ~c(_TIME_PRESENT),
        "unparseable_timestamp": event_time.isNull(),
        "implausible_timestamp": _implausible_time(event_time, cfg, now),
        "unknown_event_type": event_type.isNull(),
        "unparseable_price": c(_PRICE_PRESENT) & price.isNull(),
        "negative_price": price < 0,
        "implausible_price": _outside(price, cfg.price_bounds),
        "missing_price": priced & price.isNull(),
        "zero_price": priced & (price == 0),
        "unparseable_quantity": ~c(_QUANTITY_PRESENT) | quantity.isNull(),
        "implausible_quantity": _outside(quantity, cfg.quantity_bounds),
    }
    # Checked in the order of REASONS; `duplicate` is found below, among the records that pass.
    assert set(rules) | {"duplicate"} == set(REASONS), "every reason but duplicate has one rule here"
    checked = [reason for reason in REASONS if reason in rules]
    rule_reason = F.when(rules[checked[0]], checked[0])
    for reason in checked[1:]:
        rule_reason = rule_reason.when(rules[reason], reason)
    canonical = {name: c(name) for name in EVENT_COLUMNS} | {"user_id": stored_id, "event_type": event_type}
    reasoned = typed.select(
        *[canonical[name].alias(name) for name in EVENT_COLUMNS],
        rule_reason.alias(REASON),
        *source_cols, _FP64, _FP32,
    )
    narrow = reasoned.select(
        *EVENT_COLUMNS, REASON,
        # The source record's text is kept only for rejected records: clean rows cross the shuffle narrow.
        F.when(c(REASON).isNotNull(), _raw_record(src, cols, c("user_id"), protection)).alias(RAW),
        _FP64, _FP32,
    )

    # Exact duplicates: an exact copy has the same user, event time and fingerprint, so ordering by
    # them puts it right after its original; comparing with the row before is then enough. A false
    # match needs a 96-bit fingerprint collision between two records of one user at one instant.
    # (Three lags, not one per column: the Window operator is interpreted and costs per function.)
    by_user = Window.partitionBy("user_id").orderBy(c("event_time").asc_nulls_first(), c(_FP64), c(_FP32))
    same_as_previous = F.lit(True)
    for name in ("event_time", _FP64, _FP32):
        same_as_previous = same_as_previous & c(name).eqNullSafe(F.lag(c(name)).over(by_user))
    flagged = narrow.withColumn(_DUP, c(REASON).isNull() & F.coalesce(same_as_previous, F.lit(False)))
    # The duplicate's source record is identical to the clean copy kept; it is quarantined as the
    # canonical event in JSON (the source text does not cross the shuffle).
    canonical_json = F.to_json(F.struct(*[c(name) for name in EVENT_COLUMNS]))
    if protection.quarantine_raw == "none":
        canonical_json = F.lit(None).cast(StringType())
    return flagged.select(
        *EVENT_COLUMNS,
        F.when(c(_DUP), F.lit("duplicate")).otherwise(c(REASON)).alias(REASON),
        F.when(c(_DUP), canonical_json).otherwise(c(RAW)).alias(RAW),
    )


def _raw_record(src: _Source, cols, stored_id: Column, protection: Protection) -> Column:
    """What quarantine.raw keeps of a rejected source record (tag_events' docstring)."""
    if protection.quarantine_raw == "none":
        return F.lit(None).cast(StringType())
    mapped = set(cols.mapped().values())
    kept = [name for name in src.names if name != CORRUPT_COLUMN
            and (protection.quarantine_raw == "full" or name in mapped)]
    pseudonymised = protection.pseudonym_key is not None
    record = F.to_json(F.struct(*[
        (stored_id if pseudonymised and name == cols.user_id else src.col(name)).alias(name) for name in kept
    ]))
    if protection.quarantine_raw == "full" and not pseudonymised:
        return F.coalesce(src.col(CORRUPT_COLUMN), record)
    return record


def clean_events(tagged: DataFrame) -> DataFrame:
    """Valid, de-duplicated canonical events."""
    return tagged.filter(F.col(REASON).isNull()).select(*EVENT_COLUMNS)


def quarantine_rows(tagged: DataFrame, run_id: str, source: str) -> DataFrame:
    """One row per rejected record: run_id, source (credentials in it redacted), reason, raw, ingested_at."""
    return tagged.filter(F.col(REASON).isNotNull()).select(
        F.lit(run_id).alias("run_id"),
        F.lit(redact_text(source)).alias("source"),
        F.col(REASON).alias("reason"),
        F.col(RAW).alias("raw"),
        F.current_timestamp().alias("ingested_at"),
    )


def reason_counts(tagged: DataFrame) -> DataFrame:
    """Rows per reason (null reason = clean). Small: one row per reason."""
    return tagged.groupBy(F.col(REASON).alias("reason")).count()
