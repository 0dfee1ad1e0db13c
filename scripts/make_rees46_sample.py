"""Writes tests/data/rees46/events.csv: a small clickstream in the exact REES46 CSV layout.

The public REES46 files cannot be fetched from this environment, so the fixture is synthetic: the
events come from segspark.datagen (planted personas), written the way REES46 writes them
(`2019-10-01 00:00:00 UTC` timestamps, a numeric category_id next to the dotted category_code,
empty category_code and brand on some rows), plus a few records that must be quarantined.

    python scripts/make_rees46_sample.py
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segspark.datagen import GenerateSpec, generate_block  # noqa: E402

COLUMNS = ["event_time", "event_type", "product_id", "category_id", "category_code", "brand", "price", "user_id",
           "user_session"]


def main() -> int:
    spec = GenerateSpec(users=60, days=30, seed=46, end_date=dt.date(2019, 10, 31))
    events = generate_block(spec, 0)
    rng = np.random.default_rng(46)
    events["event_time"] = events["event_time"] + " UTC"
    events["category_id"] = 2053013552226107603 + (events["product_id"] // 1_000_000) * 7919
    blank_category = rng.random(len(events)) < 0.1
    events.loc[blank_category, "category_code"] = ""
    events.loc[rng.random(len(events)) < 0.05, "brand"] = ""
    events["user_id"] = events["user_id"] + 512_000_000  # REES46-like ids
    lines = events[COLUMNS].astype(str).agg(",".join, axis=1).tolist()
    # Records that must be quarantined: two exact copies, a bad timestamp, an unknown event type.
    lines.insert(10, lines[9])
    lines.insert(200, lines[199])
    bad_time = lines[300].split(",")
    bad_time[0] = "2019-13-45 99:00:00 UTC"
    bad_type = lines[301].split(",")
    bad_type[1] = "wishlist"
    lines += [",".join(bad_time), ",".join(bad_type)]
    out = REPO / "tests" / "data" / "rees46" / "events.csv"
    out.write_text(",".join(COLUMNS) + "\n" + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} records to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
