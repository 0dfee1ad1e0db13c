"""What dilutes the segment signal: the preparation levers, judged on every quality.py data set.

    python scripts/quality.py --users 8000 --work /tmp/q        # writes /tmp/q/<set>/out and /tmp/q/<set>/truth
    python scripts/prepare_levers.py --work /tmp/q [--sets clean,overlapping,invoices]

For each data set quality.py left under --work, it fits the project's own preparation
(`segspark.models.prepare.fit_preparation`, in Spark) on the run's `user_features` once per lever,
and clusters the prepared users with the TRUE number of personas, so that only the preparation
differs: k-means (scikit-learn, 10 starts) on every prepared feature, and a Gaussian mixture on
their 8 leading principal axes (as models.gmm does). The table gives the adjusted Rand index
against the planted personas. Levers (each a set of prepare.* overrides on the set's config):

  standard             the preparation before issue 18: log1p, caps, selection, standard scaling
  standard+families    ... plus equal weight per family of correlated features
  quantile             rank-map (quantile) scaling, every feature its own weight
  quantile+families    both: the default
  +whitening           the default, then PCA whitening to 8 axes (every axis unit variance)
  hand-picked          the default on only the oracle's hand-chosen features of the set
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import pandas as pd  # noqa: E402
from deltalake import DeltaTable  # noqa: E402
from quality import DATA_SETS  # noqa: E402
from sklearn.cluster import KMeans  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from segspark.config import load_config  # noqa: E402
from segspark.features.catalog import feature_columns  # noqa: E402
from segspark.models.prepare import fit_preparation  # noqa: E402
from segspark.runtime.session import get_spark  # noqa: E402

LEVERS: dict[str, list[str]] = {
    "standard": ["prepare.scaling=standard", "prepare.families.enabled=false"],
    "standard+families": ["prepare.scaling=standard", "prepare.families.enabled=true"],
    "quantile": ["prepare.scaling=quantile", "prepare.families.enabled=false"],
    "quantile+families": [],
    "+whitening": [],
    "hand-picked": [],
}


def lever_rows(spark, name: str, root: Path) -> list[dict]:
    data = DATA_SETS[name]
    truth = pd.read_parquet(root / "truth").astype({"user_id": str})
    features = DeltaTable(str(root / "out" / "user_features")).to_pandas().drop(columns=["as_of", "run_id"])
    users = features.merge(truth, on="user_id")
    frame = spark.createDataFrame(users.drop(columns=["persona"]))
    k = users.persona.nunique()
    rows = []
    for lever, overrides in LEVERS.items():
        extra = [f"prepare.features=[{','.join(data.oracle)}]"] if lever == "hand-picked" else []
        cfg = load_config(REPO / data.config, [*data.overrides, *overrides, *extra])
        names = [c for c in feature_columns(cfg.features) if c in users.columns]
        fitted = fit_preparation(frame, names, cfg.prepare)
        prepared = fitted.transform(frame).drop("features_vector").toPandas().merge(truth, on="user_id")
        x = prepared[fitted.selected].to_numpy(dtype=float)
        if lever == "+whitening":
            x = PCA(min(8, x.shape[1]), whiten=True, random_state=0).fit_transform(x)
        axes = PCA(min(8, x.shape[1]), random_state=0).fit_transform(x)
        kmeans = KMeans(k, n_init=10, random_state=0).fit_predict(x)
        mixtures = [GaussianMixture(k, reg_covar=cfg.models.gmm.reg_covar, random_state=s).fit(axes) for s in range(3)]
        gmm = max(mixtures, key=lambda m: m.score(axes)).predict(axes)
        rows.append({
            "set": name, "lever": lever, "dims": x.shape[1],
            "families": len([f for f in fitted.families if len(f) > 1]),
            "kmeans": round(adjusted_rand_score(prepared.persona, kmeans), 3),
            "gmm": round(adjusted_rand_score(prepared.persona, gmm), 3),
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the --work folder of a scripts/quality.py run")
    parser.add_argument("--sets", default=None, help="comma-separated (default: every set found under --work)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    names = args.sets.split(",") if args.sets else [n for n in DATA_SETS if (work / n / "out").exists()]
    spark = get_spark("segspark-levers", "local[2]", {"spark.sql.shuffle.partitions": "8"})
    rows: list[dict] = []
    try:
        for name in names:
            rows += lever_rows(spark, name, work / name)
    finally:
        spark.stop()
    print(f"{'set':<12} {'lever':<19} {'dims':>4} {'families':>8} {'kmeans':>7} {'gmm':>7}")
    for r in rows:
        print(f"{r['set']:<12} {r['lever']:<19} {r['dims']:>4} {r['families']:>8} {r['kmeans']:>7.3f} {r['gmm']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
