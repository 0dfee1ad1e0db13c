"""HDBSCAN on a sample of embeddings, and a slim artifact that assigns every user on the executors.

The deep path clusters a bounded sample of autoencoder embeddings with the `hdbscan` library
(`fit_hdbscan`) and then has to give a segment to every user, millions of them, inside pandas UDFs
that see one Arrow batch at a time. `hdbscan.approximate_predict` is a poor fit for that: it needs the
whole fitted clusterer (single-linkage and condensed trees, prediction data with a KD-tree and a
second copy of the data: ~2.2x the artifact below, pickled), and after its neighbour query it loops
in Python over the points, each time scanning the whole condensed tree (`get_tree_row_with_child`).
`SlimHdbscan` keeps only what prediction reads, as plain numpy arrays that save to one `.npz` (no
pickle) or to bytes for a UDF closure, and predicts a batch with array operations: the same
neighbour query, then gathers, and a walk up the cluster tree that loops over tree depth, never over
points.

Prediction reproduces hdbscan's approximate prediction (hdbscan 0.8.44, `hdbscan/prediction.py`):

* neighbours: the k = 2 * min_samples nearest training points of each new point, by raw distance;
* mutual reachability to each of them, max(core distance of the neighbour, distance of the new
  point's (min_samples + 1)-th neighbour, raw distance); the first neighbour (in distance order)
  with the smallest one is the point's connecting neighbour, and lambda = 1 / that distance;
* label (`approximate_predict`): start at the condensed-tree cluster the neighbour falls out of; if
  the neighbour falls out at a higher lambda than the new point's, climb while the cluster was born
  at lambda >= the point's lambda. The label is the selected cluster containing the cluster reached
  (-1 if none), and the probability min(lambda, max lambda of that selected cluster) / max lambda;
* outlier score (`approximate_predict_scores`, GLOSH for new points): (M - lambda) / M, with M the
  largest lambda anywhere under the neighbour's cluster (no climbing here, as in hdbscan), floored
  at 0 where hdbscan's goes negative (a new point denser than every training point there).

The neighbour query runs on a compiled KD-tree (`segspark.models.deep.knn`, numba) that returns the
same distances as hdbscan's scikit-learn KDTree to the last bit, 4x faster on one core, and scales
over cores (threads query chunks of a batch; 1 inside a Spark task, which owns one core). Equal
distances are the one thing it may order differently, so any row whose answer reads equal
distances (duplicated or gridded embeddings) is answered from hdbscan's own tree: labels,
probabilities and scores are then identical to hdbscan's, ties included.

On purpose, one rule differs: a point identical to a training point (nearest-neighbour distance 0)
gets that training point's FITTED label, probability and outlier score (`labels_`, `probabilities_`,
`outlier_scores_`). hdbscan's approximate prediction does not reproduce the fit for training points:
it uses lambda = 1 / the point's core distance rather than the lambda at which the point left its
cluster, so probabilities move; and labels differ where identical training points got different
labels, or where hdbscan's cluster map has gaps (`_cluster_map_from_labels`: whole sub-clusters of a
selected cluster come back as noise). With the rule, a user in the fitting sample keeps the segment
the fit gave it, and so does any other user with exactly the same embedding; identical training
points with different fitted labels stand for their majority label (`_twins`).

Anomalies: `anomaly_threshold` is the (1 - contamination) quantile of the training points' GLOSH
outlier scores; a user is an anomaly when its score is strictly above it (None: nobody is flagged),
as for the other models. More than min_samples identical embeddings in the sample have core
distance 0, so their cluster's lambda is infinite: hdbscan then gives every point of that cluster a
NaN outlier score (inf / inf) and every new point there probability 0, and so does this model. The
threshold is taken over the finite scores; note that Spark orders NaN above every number.

Cost of prediction: the neighbour query is most of it, and grows with k = 2 * min_samples; most
rows need only m + 2 neighbours (`_connect`). With min_samples left at None, m is min_cluster_size
(2% of a 50,000-row sample = 1,000): set min_samples explicitly (tens) to keep assignment cheap.
Measured on the 2-core machine (`scripts/bench.py --suite scoring`, 8-d autoencoder embeddings,
fitted on 50,000, min_samples 10): 7x faster than approximate_predict on one core, 13x on two; the
numbers for 1M users are in the README.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from segspark.models.deep.knn import CompiledKDTree
from segspark.models.npz import open_npz

# Prediction, which every Python worker that scores users imports this module for, needs numpy and
# the compiled KD-tree only. hdbscan and scikit-learn (0.8 s of imports, in each new worker) are
# imported where a fit or a tie needs them: a worker then starts scoring that much sooner, which
# showed as a stream's first micro-batch after a (re)start taking 1.2 s longer to score when its task
# landed on a fresh worker.
if TYPE_CHECKING:
    import hdbscan
    from sklearn.neighbors import KDTree

    from segspark.config import HdbscanConfig

log = logging.getLogger(__name__)

MODEL_NAME = "hdbscan"
FORMAT_VERSION = 1
# Rows of a batch queried at once: bounds the (rows x k) neighbour matrices to ~16 MB whatever the
# batch size or min_samples.
_QUERY_ELEMENTS = 1 << 20
_LEAF_SIZE = 40  # hdbscan.prediction.PredictionData builds KDTree(raw_data) with scikit-learn's default

_ARRAYS = (
    "points",
    "core_distances",
    "point_parent",
    "point_lambda",
    "tree_parent",
    "tree_child",
    "tree_lambda",
    "cluster_label",
    "cluster_max_lambda",
    "glosh_max_lambda",
    "fitted_labels",
    "fitted_probabilities",
    "fitted_outlier_scores",
    "twin",
)


def _as_matrix(values: Any, what: str, dims: int | None = None) -> np.ndarray:
    """`values` as a C-contiguous float64 (rows x dims) matrix of finite numbers, else ValueError."""
    array = np.asarray(values)
    if array.ndim == 1 and array.size == 0 and dims is not None:
        array = array.reshape(0, dims)  # an empty batch may arrive without its width
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (rows x dimensions) matrix, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{what} must be numeric, got dtype {array.dtype}")
    if dims is not None and array.shape[1] != dims:
        raise ValueError(
            f"{what} have {array.shape[1]} dimensions, but the HDBSCAN model was fitted on {dims}"
        )
    array = np.ascontiguousarray(array, dtype=np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{what} must be finite: {int((~finite).sum())} NaN/inf values in {bad_rows.size} rows "
            f"(first at row {int(bad_rows[0])}: {array[bad_rows[0]].tolist()})"
        )
    return array


@dataclass(frozen=True, eq=False)
class SlimHdbscan:
    """What HDBSCAN approximate prediction reads, as numpy arrays; predicts a batch vectorised.

    Clusters are the condensed tree's ids; per-cluster arrays are indexed by id - root, the root
    being n (the number of training points; hdbscan numbers clusters n, n + 1, ...).

    Size: (d + 6) * 8 bytes per training point, the points themselves being most of it: 5.6 MB for
    50,000 points in 8 dimensions, against 12.3 MB for the pickled fitted clusterer (2.2x; measured
    with hdbscan 0.8.44, which pickles the condensed and single-linkage trees, the prediction data with
    its KD-tree and a second copy of the points, and the exemplars). The KD-tree is not shipped but
    rebuilt on first use (~40 ms for 50,000 x 8); pickling goes through `to_bytes`.
    """

    points: np.ndarray  # (n, d) float64 training points
    core_distances: np.ndarray  # (n,) prediction_data_.core_distances (k = min_samples, self included)
    point_parent: np.ndarray  # (n,) int64 cluster the point falls out of, in the condensed tree
    point_lambda: np.ndarray  # (n,) float64 lambda at which it falls out
    tree_parent: np.ndarray  # (C - 1,) int64 cluster tree: parent cluster id
    tree_child: np.ndarray  # (C - 1,) int64 cluster tree: child cluster id
    tree_lambda: np.ndarray  # (C - 1,) float64 cluster tree: lambda at which the child is born
    cluster_label: np.ndarray  # (C,) int32 label of the selected cluster containing it, -1 for none
    cluster_max_lambda: np.ndarray  # (C,) float64 prediction_data_.max_lambdas (0 where label is -1)
    glosh_max_lambda: np.ndarray  # (C,) float64 largest lambda anywhere below the cluster (GLOSH)
    fitted_labels: np.ndarray  # (n,) int32 clusterer.labels_
    fitted_probabilities: np.ndarray  # (n,) float64 clusterer.probabilities_
    fitted_outlier_scores: np.ndarray  # (n,) float64 clusterer.outlier_scores_
    twin: np.ndarray  # (n,) int32 whose fitted values a point at these coordinates gets (_twins)
    min_samples: int  # as prediction uses it: min_samples or min_cluster_size
    anomaly_threshold: float | None  # None when contamination is 0: nobody is flagged
    # Noise users join the cluster of their nearest clustered training point, except the anomalies
    # (GLOSH score above anomaly_threshold), which stay noise (`assign`; models.hdbscan.assign_noise).
    assign_noise: bool = False
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.points.shape[0] if self.points.ndim == 2 else -1
        clusters = self.cluster_label.shape[0]
        problems = [
            f"{name} has shape {getattr(self, name).shape}, expected {shape}"
            for name, shape in (
                ("points", (n, self.dims)),
                ("core_distances", (n,)),
                ("point_parent", (n,)),
                ("point_lambda", (n,)),
                ("tree_parent", (clusters - 1,)),
                ("tree_child", (clusters - 1,)),
                ("tree_lambda", (clusters - 1,)),
                ("cluster_max_lambda", (clusters,)),
                ("glosh_max_lambda", (clusters,)),
                ("fitted_labels", (n,)),
                ("fitted_probabilities", (n,)),
                ("fitted_outlier_scores", (n,)),
                ("twin", (n,)),
            )
            if getattr(self, name).shape != shape
        ]
        if self.points.ndim != 2 or clusters < 1:
            problems.insert(0, f"points must be 2-D and there must be a root cluster (got {clusters})")
        elif n < 2 * self.min_samples:
            problems.append(
                f"{n} training points, fewer than the 2 * min_samples = {2 * self.min_samples} queried"
            )
        if problems:
            raise ValueError("inconsistent HDBSCAN artifact: " + "; ".join(problems))

    # -- shape -------------------------------------------------------------------------------------

    @property
    def dims(self) -> int:
        return int(self.points.shape[1]) if self.points.ndim == 2 else -1

    @property
    def n_clusters(self) -> int:
        return int(self.cluster_label.max(initial=-1)) + 1

    @property
    def map_gaps(self) -> int:
        """Labelled training points whose own condensed-tree cluster the prediction map does not give
        their label (0 for a sound map; see `_cluster_map_from_labels`)."""
        labelled = np.flatnonzero(self.fitted_labels >= 0)
        own = self.cluster_label[self.point_parent[labelled] - self.points.shape[0]]
        return int((own != self.fitted_labels[labelled]).sum())

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what `save` writes, give or take the npz headers)."""
        return sum(getattr(self, name).nbytes for name in _ARRAYS)

    # -- prediction --------------------------------------------------------------------------------

    def _prepared(self) -> tuple[CompiledKDTree, np.ndarray, np.ndarray]:
        """Neighbour index over the points and the cluster tree as dense (parent index, birth lambda)
        arrays, built once per instance (a UDF builds them once per Python worker, not per batch)."""
        if "tree" not in self._cache:
            root = self.points.shape[0]
            parent = np.full(self.cluster_label.shape[0], -1, dtype=np.int64)
            birth = np.full(self.cluster_label.shape[0], -np.inf)
            parent[self.tree_child - root] = self.tree_parent - root
            birth[self.tree_child - root] = self.tree_lambda
            self._cache["tree"] = (CompiledKDTree(self.points), parent, birth)
        return self._cache["tree"]

    def _reference_tree(self) -> KDTree:
        """hdbscan's own neighbour index (scikit-learn KDTree, leaf_size 40, euclidean), for the rows
        whose neighbours include equal distances: only it returns them in hdbscan's order."""
        if "reference" not in self._cache:
            from sklearn.neighbors import KDTree

            self._cache["reference"] = KDTree(self.points, leaf_size=_LEAF_SIZE)
        return self._cache["reference"]

    def predict(self, points: Any, workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels int32, probabilities float64, outlier_scores float64) for a batch of points.

        Same as hdbscan's approximate_predict and approximate_predict_scores, except that a point
        identical to a training point gets that point's fitted values (module docstring).
        `workers`: threads querying chunks of the batch (1 inside a Spark task, which owns one core;
        -1: one per CPU). The KD-tree query releases the GIL.
        """
        x = _as_matrix(points, "points to predict", dims=self.dims)
        rows = x.shape[0]
        labels = np.empty(rows, dtype=np.int32)
        probabilities = np.empty(rows, dtype=np.float64)
        scores = np.empty(rows, dtype=np.float64)
        if rows == 0:
            return labels, probabilities, scores
        self._prepared()
        k = 2 * self.min_samples
        threads = (os.cpu_count() or 1) if workers == -1 else max(1, workers)
        step = max(256, _QUERY_ELEMENTS // k)
        if threads > 1:
            step = min(step, max(256, -(-rows // threads)))
        chunks = [slice(start, min(rows, start + step)) for start in range(0, rows, step)]

        def run(chunk: slice) -> None:
            self._predict_chunk(x[chunk], labels[chunk], probabilities[chunk], scores[chunk])

        if threads > 1 and len(chunks) > 1:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(run, chunks))
        else:
            for chunk in chunks:
                run(chunk)
        return labels, probabilities, scores

    def _connect(
        self, x: np.ndarray, tree: CompiledKDTree
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(connecting training point, lambda, nearest distance, nearest training point) per row.

        hdbscan queries k = 2m neighbours (m = min_samples) and takes the first one with the smallest
        mutual reachability max(core_j, d_m, d_j). No neighbour can do better than d_m (the point's
        own core distance), and neighbours 0..m are within d_m, so when one of them has core_j <= d_m
        the answer is the first such one, at d_m: an m + 2 query settles it, and only the other rows
        (about 1% in our measurements) need all 2m. The answer depends on the order of the
        neighbours, which is unique when their distances all differ; a row with equal distances
        among those it reads (duplicated or gridded embeddings) is answered from hdbscan's own tree,
        so that equal distances come in hdbscan's order and results stay identical to hdbscan's.
        """
        m = self.min_samples
        rows = x.shape[0]
        nearest = np.empty(rows, dtype=np.intp)
        reach_min = np.empty(rows, dtype=np.float64)
        first_distance = np.empty(rows, dtype=np.float64)
        first_index = np.empty(rows, dtype=np.intp)

        def settle(picked: np.ndarray, distances: np.ndarray, indices: np.ndarray) -> np.ndarray:
            """Rows (of `picked`) whose answer the m + 2 nearest decide; those rows are filled in."""
            own_core = distances[:, m]
            qualifies = self.core_distances[indices[:, : m + 1]] <= own_core[:, None]
            settled = qualifies.any(axis=1) & (np.diff(distances, axis=1) > 0.0).all(axis=1)
            done = np.flatnonzero(settled)
            nearest[picked[done]] = indices[done, qualifies[done].argmax(axis=1)]
            reach_min[picked[done]] = own_core[done]
            first_distance[picked[done]] = distances[done, 0]
            first_index[picked[done]] = indices[done, 0]
            return settled

        def full(picked: np.ndarray, distances: np.ndarray, indices: np.ndarray) -> None:
            """hdbscan's rule over all 2m neighbours."""
            reach = np.maximum(np.maximum(self.core_distances[indices], distances[:, m, None]), distances)
            position = reach.argmin(axis=1)
            at = np.arange(picked.size)
            nearest[picked] = indices[at, position]
            reach_min[picked] = reach[at, position]
            first_distance[picked] = distances[:, 0]
            first_index[picked] = indices[:, 0]

        everyone = np.arange(rows)
        n = self.points.shape[0]
        k = 2 * m  # the training set has at least 2m points (checked when the artifact is made)
        short = min(m + 2, n)
        distances, indices = tree.query(x, short)
        rest = everyone[~settle(everyone, distances, indices)]
        if rest.size:
            # One more than hdbscan reads (when there is one): an equal distance just past its last place
            # would make its set ambiguous.
            distances, indices = tree.query(x[rest], min(k + 1, n))
            distinct = (np.diff(distances, axis=1) > 0.0).all(axis=1)
            full(rest[distinct], distances[distinct, :k], indices[distinct, :k])
            tied = rest[~distinct]
            if tied.size:
                distances, indices = self._reference_tree().query(x[tied], k=k)
                full(tied, distances, indices)
        with np.errstate(divide="ignore"):
            lam = np.where(reach_min > 0.0, 1.0 / reach_min, np.finfo(np.float64).max)
        return nearest, lam, first_distance, first_index

    def _predict_chunk(
        self, x: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, scores: np.ndarray
    ) -> None:
        tree, cluster_parent, cluster_birth = self._prepared()
        root = self.points.shape[0]
        if self.tree_child.shape[0] == 0:
            # No clusters: hdbscan predicts noise with probability 0 and outlier score 1.
            labels[:], probabilities[:], scores[:] = -1, 0.0, 1.0
            distances, indices = tree.query(x, k=1)
            first_distance, first_index = distances[:, 0], indices[:, 0]
        else:
            nearest, lam, first_distance, first_index = self._connect(x, tree)
            start = self.point_parent[nearest] - root
            # Labels: climb from the neighbour's cluster while the cluster was born at >= lambda.
            cluster = start.copy()
            climbing = np.flatnonzero(self.point_lambda[nearest] > lam)
            while climbing.size:
                current = cluster[climbing]
                up = (current > 0) & (cluster_birth[current] >= lam[climbing])
                cluster[climbing[up]] = cluster_parent[current[up]]
                climbing = climbing[up]
            labels[:] = self.cluster_label[cluster]
            max_lambda = self.cluster_max_lambda[cluster]
            with np.errstate(divide="ignore", invalid="ignore"):
                in_cluster = np.where(max_lambda > 0.0, np.minimum(max_lambda, lam) / max_lambda, 1.0)
                glosh = self.glosh_max_lambda[start]
                # hdbscan's raw (M - lambda) / M goes below 0 for a new point denser than anything
                # under its cluster; GLOSH is a score in [0, 1] and such a point is no outlier: 0.
                scores[:] = np.where(glosh > 0.0, np.maximum(glosh - lam, 0.0) / glosh, 0.0)
            probabilities[:] = np.where(labels >= 0, in_cluster, 0.0)

        exact = np.flatnonzero(first_distance == 0.0)
        if exact.size:
            twin = self.twin[first_index[exact]]
            labels[exact] = self.fitted_labels[twin]
            probabilities[exact] = self.fitted_probabilities[twin]
            scores[exact] = self.fitted_outlier_scores[twin]

    def assign(self, points: Any, workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`predict`, then (with assign_noise) every noise row that is not an anomaly gets the label of
        its nearest clustered training point, with probability that point's fitted probability times
        min(1, its core distance / the distance to it): 1 inside the cluster's density, falling with
        the distance beyond it. HDBSCAN calls points in the overlap of two clusters noise; a segment
        table needs a segment for them, and only the truly isolated (is_anomaly) keep segment -1."""
        labels, probabilities, scores = self.predict(points, workers)
        if self.assign_noise:
            x = _as_matrix(points, "points to assign", dims=self.dims)
            self._join_nearest(x, labels, probabilities, scores)
        return labels, probabilities, scores

    def assigned_fitted_labels(self) -> np.ndarray:
        """The fitted labels after the noise assignment: what `assign` gives the training points."""
        labels = self.fitted_labels.copy()
        if self.assign_noise:
            probabilities = self.fitted_probabilities.copy()
            self._join_nearest(self.points, labels, probabilities, self.fitted_outlier_scores.copy())
        return labels

    def _join_nearest(
        self, x: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, scores: np.ndarray
    ) -> None:
        clustered = np.flatnonzero(self.fitted_labels >= 0)
        with np.errstate(invalid="ignore"):  # NaN scores (infinite density) are no anomaly
            rows = np.flatnonzero((labels < 0) & ~self.is_anomaly(scores))
        if rows.size == 0 or clustered.size == 0:
            return
        if "clustered" not in self._cache:
            self._cache["clustered"] = CompiledKDTree(self.points[clustered])
        distances, indices = self._cache["clustered"].query(x[rows], 1)
        nearest = clustered[indices[:, 0]]
        labels[rows] = self.fitted_labels[nearest]
        core = self.core_distances[nearest]
        with np.errstate(divide="ignore", invalid="ignore"):
            closeness = np.where(distances[:, 0] > core, core / distances[:, 0], 1.0)
        probabilities[rows] = self.fitted_probabilities[nearest] * closeness

    def is_anomaly(self, outlier_scores: np.ndarray) -> np.ndarray:
        """Scores strictly above the anomaly threshold (all False when there is none)."""
        scores = np.asarray(outlier_scores, dtype=np.float64)
        if self.anomaly_threshold is None:
            return np.zeros(scores.shape, dtype=bool)
        return scores > self.anomaly_threshold

    # -- persistence -------------------------------------------------------------------------------

    def _payload(self) -> dict[str, np.ndarray]:
        payload = {name: getattr(self, name) for name in _ARRAYS}
        payload["format_version"] = np.array(FORMAT_VERSION)
        payload["min_samples"] = np.array(self.min_samples, dtype=np.int64)
        payload["anomaly_threshold"] = np.array(
            np.nan if self.anomaly_threshold is None else self.anomaly_threshold, dtype=np.float64
        )
        payload["assign_noise"] = np.array(self.assign_noise)
        return payload

    def save(self, path: str) -> None:
        """One .npz of plain arrays: loads with allow_pickle=False. A path without the .npz suffix
        gets it (np.savez's rule); `load` takes the same path."""
        np.savez(path, **self._payload())

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **self._payload())
        return buffer.getvalue()

    def __reduce__(self) -> tuple:
        # Pickled (e.g. captured by a UDF closure) as its npz bytes: no KD-tree, no pickled arrays.
        return (SlimHdbscan.from_bytes, (self.to_bytes(),))

    @classmethod
    def load(cls, path: str) -> SlimHdbscan:
        if not str(path).endswith(".npz"):
            path = f"{path}.npz"
        with open_npz(path) as data:
            return cls._from_npz(data, str(path))

    @classmethod
    def from_bytes(cls, blob: bytes) -> SlimHdbscan:
        with open_npz(blob) as data:
            return cls._from_npz(data, "bytes")

    @classmethod
    def _from_npz(cls, data: Any, source: str) -> SlimHdbscan:
        missing = [
            name
            for name in (*_ARRAYS, "format_version", "min_samples", "anomaly_threshold")
            if name not in data
        ]
        if missing:
            raise ValueError(f"not an HDBSCAN artifact ({source}): missing {', '.join(missing)}")
        version = int(data["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(
                f"HDBSCAN artifact {source} has format version {version}, expected {FORMAT_VERSION}"
            )
        threshold = float(data["anomaly_threshold"])
        return cls(
            **{name: data[name] for name in _ARRAYS},
            min_samples=int(data["min_samples"]),
            anomaly_threshold=None if np.isnan(threshold) else threshold,
            # Artifacts saved before noise assignment existed predict as hdbscan does.
            assign_noise=bool(data["assign_noise"]) if "assign_noise" in data else False,
        )

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_clusterer(
        cls, clusterer: hdbscan.HDBSCAN, contamination: float, repair_cluster_map: bool = False,
        assign_noise: bool = False,
    ) -> SlimHdbscan:
        """Extract the prediction data of a clusterer fitted with prediction_data=True.

        repair_cluster_map: build the cluster -> label map from the fitted labels instead of taking
        hdbscan's, which can leave part of a selected cluster unlabelled (`_cluster_map_from_labels`).
        Labels then differ from hdbscan's approximate_predict exactly where hdbscan's map has gaps."""
        prediction = clusterer.prediction_data_
        if prediction is None:
            raise ValueError("the clusterer has no prediction data: fit it with prediction_data=True")
        points = np.ascontiguousarray(prediction.raw_data, dtype=np.float64)
        n = points.shape[0]
        condensed = clusterer.condensed_tree_._raw_tree
        is_point = condensed["child_size"] == 1
        cluster_ids = np.unique(np.concatenate([condensed["parent"], condensed["child"][~is_point]]))
        root = n
        if cluster_ids.size == 0:
            cluster_ids = np.array([root])
        if cluster_ids[0] != root or cluster_ids[-1] != root + cluster_ids.size - 1:
            raise ValueError(
                f"unexpected condensed tree: cluster ids {cluster_ids[0]}..{cluster_ids[-1]} "
                f"({cluster_ids.size} clusters), expected {root}..{root + cluster_ids.size - 1}"
            )
        clusters = cluster_ids.size

        point_parent = np.full(n, -1, dtype=np.int64)
        point_lambda = np.full(n, np.nan)
        point_rows = condensed[is_point]
        point_parent[point_rows["child"]] = point_rows["parent"]
        point_lambda[point_rows["child"]] = point_rows["lambda_val"]
        if (point_parent < 0).any():
            raise ValueError(
                f"{int((point_parent < 0).sum())} training points missing from the condensed tree"
            )

        cluster_tree = prediction.cluster_tree
        fitted_labels = np.asarray(clusterer.labels_, dtype=np.int32)
        if repair_cluster_map:
            cluster_label, cluster_max_lambda = _cluster_map_from_labels(
                condensed, point_parent, fitted_labels, clusters
            )
        else:
            cluster_label = np.full(clusters, -1, dtype=np.int32)
            cluster_max_lambda = np.zeros(clusters)
            for cluster, label in prediction.cluster_map.items():
                cluster_label[int(cluster) - root] = label
                cluster_max_lambda[int(cluster) - root] = prediction.max_lambdas[cluster]

        # GLOSH: the largest lambda of any row under each cluster, propagated exactly as
        # approximate_predict_scores does it (one pass over the tree rows in reverse order).
        glosh = np.full(clusters, -np.inf)
        np.maximum.at(glosh, condensed["parent"] - root, condensed["lambda_val"])
        for row in np.flatnonzero(~is_point)[::-1]:
            child, parent = condensed["child"][row] - root, condensed["parent"][row] - root
            if glosh[child] > glosh[parent]:
                glosh[parent] = glosh[child]

        fitted_scores = np.asarray(clusterer.outlier_scores_, dtype=np.float64)
        slim = cls(
            points=points,
            core_distances=np.ascontiguousarray(prediction.core_distances, dtype=np.float64),
            point_parent=point_parent,
            point_lambda=point_lambda,
            tree_parent=np.ascontiguousarray(cluster_tree["parent"], dtype=np.int64),
            tree_child=np.ascontiguousarray(cluster_tree["child"], dtype=np.int64),
            tree_lambda=np.ascontiguousarray(cluster_tree["lambda_val"], dtype=np.float64),
            cluster_label=cluster_label,
            cluster_max_lambda=cluster_max_lambda,
            glosh_max_lambda=glosh,
            fitted_labels=fitted_labels,
            fitted_probabilities=np.asarray(clusterer.probabilities_, dtype=np.float64),
            fitted_outlier_scores=fitted_scores,
            twin=_twins(points, fitted_labels),
            min_samples=int(clusterer.min_samples or clusterer.min_cluster_size),
            anomaly_threshold=anomaly_threshold(fitted_scores, contamination),
            assign_noise=assign_noise,
        )
        if np.isnan(fitted_scores).any():
            log.warning(
                "%d training points have a NaN GLOSH outlier score: more than min_samples identical "
                "embeddings make a cluster's lambda infinite, and then hdbscan (and this model) give its "
                "points NaN outlier scores and new points there probability 0",
                int(np.isnan(fitted_scores).sum()),
            )
        if slim.map_gaps:
            log.warning(
                "hdbscan's prediction map leaves %d labelled training points in clusters it labels -1: "
                "new points reaching those clusters are predicted as noise (repair_cluster_map=True fixes it)",
                slim.map_gaps,
            )
        return slim


def _cluster_map_from_labels(
    condensed: np.ndarray, point_parent: np.ndarray, labels: np.ndarray, clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """(label, max lambda) per cluster, from the selected clusters as the fitted labels define them.

    hdbscan 0.8.44's CondensedTree._select_clusters() takes, for each label, the smallest cluster id
    that any of its points falls out of directly. When no point falls out of the selected cluster
    itself (it splits before losing one: common with duplicated or gridded data, rare otherwise) it
    returns one of its sub-clusters instead, and prediction then labels -1 every new point that lands
    in the other sub-clusters, training points included. Here the selected cluster of a label is the
    lowest common ancestor of the clusters its points fall out of; every cluster under it gets the
    label and its max lambda, as in hdbscan's PredictionData."""
    n = point_parent.shape[0]
    is_cluster = condensed["child"] >= n
    parent = np.full(clusters, -1, dtype=np.int64)
    parent[condensed["child"][is_cluster] - n] = condensed["parent"][is_cluster] - n
    children: dict[int, list[int]] = {}
    for child in np.flatnonzero(parent >= 0):
        children.setdefault(int(parent[child]), []).append(int(child))
    group_max = np.full(clusters, -np.inf)
    np.maximum.at(group_max, condensed["parent"] - n, condensed["lambda_val"])

    def ancestors(cluster: int) -> list[int]:
        chain = [cluster]
        while parent[chain[-1]] >= 0:
            chain.append(int(parent[chain[-1]]))
        return chain

    cluster_label = np.full(clusters, -1, dtype=np.int32)
    cluster_max_lambda = np.zeros(clusters)
    for label in range(int(labels.max(initial=-1)) + 1):
        segments = np.unique(point_parent[labels == label]) - n
        if segments.size == 0:
            continue
        chain = ancestors(int(segments[0]))
        common = set(chain)
        for segment in segments[1:]:
            common &= set(ancestors(int(segment)))
        selected = next(c for c in chain if c in common)
        below = [selected]
        for cluster in below:  # grows while iterating: a breadth-first walk of the subtree
            below.extend(children.get(cluster, []))
        cluster_label[below] = label
        cluster_max_lambda[below] = group_max[selected]
    return cluster_label, cluster_max_lambda


def _twins(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each training point, the training point whose fitted values stand for its coordinates.

    Identical training points can get different fitted labels (hdbscan breaks the ties in its
    spanning tree arbitrarily), and a new point at those coordinates cannot tell them apart. It gets
    the fitted values of the group's majority label (ties: the label whose first member comes first),
    taken from that label's first member; a point without duplicates stands for itself."""
    n = points.shape[0]
    index = np.arange(n)
    # + 0.0 turns -0.0 into 0.0: they are the same coordinates (distance 0) but different bytes.
    _, group, counts = np.unique(points + 0.0, axis=0, return_inverse=True, return_counts=True)
    group = group.ravel()
    if (counts == 1).all():
        return index.astype(np.int32)
    order = np.lexsort((index, labels, group))  # by group, then label, then row
    sorted_group, sorted_label = group[order], labels[order]
    starts = np.flatnonzero(
        np.r_[True, (sorted_group[1:] != sorted_group[:-1]) | (sorted_label[1:] != sorted_label[:-1])]
    )
    run_length = np.diff(np.r_[starts, n])
    run_group, run_first = sorted_group[starts], order[starts]
    ranked = np.lexsort((run_first, -run_length, run_group))  # by group, then longest run, then earliest
    best = ranked[np.r_[True, run_group[ranked][1:] != run_group[ranked][:-1]]]
    representative = np.empty(counts.size, dtype=np.int64)
    representative[run_group[best]] = run_first[best]
    return representative[group].astype(np.int32)


def anomaly_threshold(scores: np.ndarray, contamination: float) -> float | None:
    """(1 - contamination) quantile of the finite scores; None when contamination is 0.

    GLOSH scores are NaN where a cluster's largest lambda is infinite (many identical points)."""
    if contamination <= 0.0:
        return None
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return None
    return float(np.quantile(finite, 1.0 - contamination))


@dataclass(frozen=True)
class FittedHdbscan:
    clusterer: hdbscan.HDBSCAN  # the full fitted object: for tests and reports, never shipped
    artifact: SlimHdbscan  # what assignment needs
    min_cluster_size: int
    min_samples: int  # effective: min_samples or min_cluster_size
    repair_cluster_map: bool
    cluster_selection_method: str
    cluster_selection_epsilon: float
    contamination: float

    def metrics(self) -> dict:
        labels = self.artifact.fitted_labels
        assigned = self.artifact.assigned_fitted_labels()
        sizes = np.bincount(assigned[assigned >= 0], minlength=self.artifact.n_clusters)
        return {
            "model": MODEL_NAME,
            "n_clusters": self.artifact.n_clusters,
            "cluster_sizes": [int(s) for s in sizes],
            # HDBSCAN's own noise (low density), and what stays noise after the assignment.
            "density_noise_share": float((labels < 0).mean()) if labels.size else 0.0,
            "assign_noise": self.artifact.assign_noise,
            "noise_share": float((assigned < 0).mean()) if assigned.size else 0.0,
            "sample_rows": int(labels.size),
            "dimensions": self.artifact.dims,
            "min_cluster_size": self.min_cluster_size,
            "min_samples": self.min_samples,
            "cluster_selection_method": self.cluster_selection_method,
            "cluster_selection_epsilon": self.cluster_selection_epsilon,
            "contamination": self.contamination,
            "anomaly_threshold": self.artifact.anomaly_threshold,
            "nan_outlier_scores": int(np.isnan(self.artifact.fitted_outlier_scores).sum()),  # see log warning
            "prediction_map_gaps": self.artifact.map_gaps,  # > 0: see _cluster_map_from_labels
            "repair_cluster_map": self.repair_cluster_map,
            "artifact_bytes": self.artifact.nbytes,
        }


def sample_problem(n: int, cfg: HdbscanConfig) -> str | None:
    """Why `n` embeddings are too few for HDBSCAN with these settings (None: they are enough)."""
    min_cluster_size = cfg.min_cluster_size or max(2, round(cfg.min_cluster_share * n))
    min_samples = cfg.min_samples or min_cluster_size
    if n < min_cluster_size:
        return f"HDBSCAN needs at least min_cluster_size = {min_cluster_size} embeddings, got {n}"
    if n < 2 * min_samples:
        return (
            f"prediction queries the 2 * min_samples = {2 * min_samples} nearest embeddings of the sample, "
            f"so it needs at least {2 * min_samples} rows, got {n}"
        )
    return None


def fit_hdbscan(embeddings: Any, cfg: HdbscanConfig, repair_cluster_map: bool = False) -> FittedHdbscan:
    """Fit HDBSCAN on an (already sampled) rows x dimensions matrix of embeddings.

    min_cluster_size: cfg.min_cluster_size, else round(min_cluster_share * rows), at least 2.
    repair_cluster_map: see SlimHdbscan.from_clusterer (off: labels exactly as hdbscan predicts them).
    """
    x = _as_matrix(embeddings, "embeddings")
    n, dims = x.shape
    min_cluster_size = cfg.min_cluster_size or max(2, round(cfg.min_cluster_share * n))
    min_samples = cfg.min_samples or min_cluster_size
    problem = sample_problem(n, cfg)
    if problem is not None:
        raise ValueError(problem)
    if n > cfg.sample_size:
        log.warning("HDBSCAN fitted on %d embeddings, more than sample_size = %d", n, cfg.sample_size)
    import hdbscan

    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=int(min_cluster_size),
        min_samples=cfg.min_samples,
        cluster_selection_method=cfg.cluster_selection_method,
        cluster_selection_epsilon=float(cfg.cluster_selection_epsilon),
        prediction_data=True,
        core_dist_n_jobs=1,
    ).fit(x)
    fitted = FittedHdbscan(
        clusterer=clusterer,
        artifact=SlimHdbscan.from_clusterer(clusterer, cfg.contamination, repair_cluster_map, cfg.assign_noise),
        min_cluster_size=int(min_cluster_size),
        min_samples=int(min_samples),
        repair_cluster_map=repair_cluster_map,
        cluster_selection_method=cfg.cluster_selection_method,
        cluster_selection_epsilon=float(cfg.cluster_selection_epsilon),
        contamination=cfg.contamination,
    )
    metrics = fitted.metrics()
    log.info(
        "HDBSCAN on %d x %d embeddings (min_cluster_size=%d, min_samples=%d): %d clusters, %.1f%% noise "
        "(%.1f%% after the noise assignment)",
        n,
        dims,
        min_cluster_size,
        min_samples,
        metrics["n_clusters"],
        100.0 * metrics["density_noise_share"],
        100.0 * metrics["noise_share"],
    )
    return fitted
