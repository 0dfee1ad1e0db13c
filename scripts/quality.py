"""Segment quality on planted personas: every model's ARI against the generator's truth, per data set.

    python scripts/quality.py [--users 8000] [--seed 21] [--sets clean,overlapping,invoices] [--set key=value ...]

For each set it generates the data (`segspark.datagen`), runs the whole pipeline on it with the
set's config and prints one table row per model: the chosen k, the adjusted Rand index against the
planted personas over all users, the ARI over the users not called noise (segment -1) and the noise
share. A last row per set, `oracle`, is a reference and not a segspark model: k-means with the TRUE
k on a small hand-chosen set of the run's own user features (the set's `oracle`: for clickstreams
funnel rates, price level, sessions, events per session, time-of-day shares; for invoices RFM,
basket, price level, returns, time-of-day shares), standardised. It says how much signal the data
hold for a plain method that is told what matters; the models are judged against the truth, not
against it.

Sets (DATA_SETS below):
  clean        the generator's default personas, REES46 layout (conf/local.yaml)
  overlapping  personas told apart only by mixtures of shared traits, wide per-user blur, a deep
               category tree; REES46 layout (conf/local.yaml)
  invoices     the overlapping personas' purchases as invoice lines (UCI Online Retail layout, CSV,
               with cancellations; conf/generated_invoices.yaml). Only customers with a purchase are
               in the data and the truth. Overlapping, not clean: two clean personas (window shopper,
               cart abandoner) practically never buy, so as invoices they would be a few stray
               customers labelled by views and carts that this layout does not have. Every overlapping
               persona buys (the browsers rarely), and they differ in mixtures of frequency,
               recency, basket size, price level, time of day, country mix and return rate: no
               views, carts or sessions, and categories only in the description text, which the
               pipeline does not read (as in the real data).
  overlapping_csv  the overlapping set as REES46 CSV files read through conf/clickstream.yaml, as a
               new user would bring them (top-level categories only)

The table goes to stdout; `--json FILE` also writes every row as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from deltalake import DeltaTable  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

from segspark import usecases  # noqa: E402
from segspark.config import load_config  # noqa: E402
from segspark.datagen import GenerateSpec, write_dataset  # noqa: E402
from segspark.runtime.session import get_spark  # noqa: E402

# The oracle's hand-chosen features (feature -> logged: log1p where heavy-tailed), as in the usual
# analyst's recipe for the layout.
ORACLE_FEATURES = {
    "view_to_cart_rate": False, "cart_to_purchase_rate": False, "remove_share": False,
    "price_viewed_median": True, "sessions": True, "events_per_session": True,
    "evening_share": False, "night_share": False, "afternoon_share": False,
}
# Invoices have no views, carts or sessions of their own: RFM, basket, price level, returns, time of day.
INVOICE_ORACLE_FEATURES = {
    "frequency": True, "monetary": True, "recency_days": True, "basket_size": True, "avg_order_value": True,
    "price_bought_median": True, "return_share": False,
    "evening_share": False, "night_share": False, "afternoon_share": False,
}


@dataclass(frozen=True)
class DataSet:
    personas: str  # datagen persona set
    config: str  # config file, relative to the repository
    overrides: tuple[str, ...] = field(default_factory=tuple)
    layout: str = "rees46"  # datagen layout
    format: str = "parquet"  # written as
    oracle: dict[str, bool] = field(default_factory=lambda: dict(ORACLE_FEATURES))  # the oracle row's features


DATA_SETS: dict[str, DataSet] = {
    "clean": DataSet("clean", "conf/local.yaml"),
    "overlapping": DataSet("overlapping", "conf/local.yaml"),
    "invoices": DataSet("overlapping", "conf/generated_invoices.yaml", layout="invoices", format="csv",
                        oracle=INVOICE_ORACLE_FEATURES),
    # The overlapping users as a new user would bring REES46 files: CSV through conf/clickstream.yaml
    # (top-level categories only, the source's sessions). The generator writes times without " UTC".
    "overlapping_csv": DataSet("overlapping", "conf/clickstream.yaml", format="csv",
                               overrides=("input.timestamp_format=yyyy-MM-dd HH:mm:ss",)),
}


def run_set(spark, name: str, data: DataSet, users: int, seed: int, overrides: list[str], work: Path) -> list[dict]:
    root = work / name
    write_dataset(spark, GenerateSpec(users=users, seed=seed, personas=data.personas, layout=data.layout), str(root),
                  data.format, overwrite=True)
    cfg = load_config(REPO / data.config,
                      [f"input.path={root}/events", f"output.root={root}/out", *data.overrides, *overrides])
    result = usecases.run(spark, cfg, run_id="quality")
    truth = spark.read.parquet(f"{root}/truth").toPandas().astype({"user_id": str})
    segments = DeltaTable(f"{root}/out/user_segments").to_pandas().merge(truth, on="user_id")
    rows = []
    for model, group in segments.groupby("model", sort=False):
        kept = group[group.segment != -1]
        metrics = result.metrics.get(model, {})
        rows.append({
            "set": name, "model": model, "users": len(group), "k": metrics.get("k"),
            "ari": round(adjusted_rand_score(group.persona, group.segment), 4),
            "ari_non_noise": round(adjusted_rand_score(kept.persona, kept.segment), 4) if len(kept) else None,
            "noise_share": round(1 - len(kept) / len(group), 4),
            "reason": metrics.get("reason"),
        })
    features = DeltaTable(f"{root}/out/user_features").to_pandas().merge(truth, on="user_id")
    rows.append(oracle_row(name, features, data.oracle))
    return rows


def oracle_row(name: str, features, oracle: dict[str, bool]) -> dict:
    columns = []
    for feature, logged in oracle.items():
        values = features[feature].astype(float).fillna(features[feature].median()).to_numpy()
        columns.append(np.log1p(np.maximum(values, 0)) if logged else values)
    x = np.column_stack(columns)
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1)
    k = features.persona.nunique()
    labels = KMeans(k, n_init=10, random_state=0).fit_predict(x)
    ari = round(adjusted_rand_score(features.persona, labels), 4)
    return {"set": name, "model": "oracle", "users": len(features), "k": k, "ari": ari, "ari_non_noise": ari,
            "noise_share": 0.0, "reason": "reference: k-means, true k, hand-chosen features"}


def print_table(rows: list[dict]) -> None:
    header = f"{'set':<12} {'model':<17} {'k':>3} {'ARI':>7} {'ARI non-noise':>14} {'noise':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        non_noise = "" if r["ari_non_noise"] is None else f"{r['ari_non_noise']:.3f}"
        print(f"{r['set']:<12} {r['model']:<17} {r['k'] or '':>3} {r['ari']:>7.3f} {non_noise:>14} "
              f"{r['noise_share']:>7.1%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--sets", default=",".join(DATA_SETS), help=f"comma-separated, of {', '.join(DATA_SETS)}")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides, dotted.key=value")
    parser.add_argument("--work", default=None, help="where data and tables go (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in DATA_SETS]
    if unknown:
        parser.error(f"unknown sets {unknown}; known: {', '.join(DATA_SETS)}")
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work or tempfile.mkdtemp(prefix="segspark-quality-"))
    spark = get_spark("segspark-quality", "local[2]", {"spark.sql.shuffle.partitions": "8"})
    rows: list[dict] = []
    try:
        for name in names:
            rows += run_set(spark, name, DATA_SETS[name], args.users, args.seed, args.overrides, work)
    finally:
        spark.stop()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
