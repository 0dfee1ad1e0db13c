"""Exact k-nearest-neighbour queries for HDBSCAN prediction: a compiled KD-tree (numba).

HDBSCAN's approximate prediction spends most of its time in one exact neighbour query per new point
(scikit-learn's KDTree, leaf_size 40, one thread: ~40 us per point for k = 20 in 8 dimensions). This
tree answers the same query several times faster on one core and scales over cores: small leaves,
an explicit stack that visits the nearer child first, pruning by the squared distance to each
node's bounding box, and a sorted insertion list of the k best. It is built once per model and
Python worker (~10 ms for 50,000 x 8) and never shipped.

Distances are bit-for-bit those of scikit-learn (float64, squared differences summed over the
dimensions in order, square root at the end; without fastmath LLVM keeps that order), so callers can
compare them with scikit-learn's. The ORDER of equal distances may differ: callers that depend on it
(`SlimHdbscan._connect`) send rows with ties to scikit-learn's tree.

Numba compiles the functions on first use in a process (~8 s of CPU) and caches the machine code
beside this file (or in NUMBA_CACHE_DIR), so Spark's Python workers load it instead of compiling.
The cache is keyed by the source's content, not its path: `compile_ahead` fills it where the
executors' environment is packed (scripts/package.sh), and the archive, unpacked anywhere on nodes
of the same CPU, carries machine code that its workers load (on another CPU they compile, as before).
"""

from __future__ import annotations

import os
import tempfile


def _cache_dir_fallback() -> None:
    """Numba caches next to this file; where that is read-only (a system site-packages on a cluster)
    and no NUMBA_CACHE_DIR is set, cache in the temp dir instead of failing to compile with cache=True."""
    if "NUMBA_CACHE_DIR" not in os.environ and not os.access(os.path.dirname(__file__), os.W_OK):
        os.environ["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"segspark-numba-{os.getuid()}")


_cache_dir_fallback()

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402

LEAF_SIZE = 64  # leaves are scanned vectorised: in 8-d, 64 points per leaf measured fastest (16..256)


@njit(cache=True)
def _build(points: np.ndarray, leaf_size: int):
    """Median splits on the widest dimension of each node's bounding box, iteratively.

    Returns (order, start, end, left, right, lo, hi): `order` lists the point indices leaf by leaf;
    node i holds order[start[i]:end[i]], its children are left[i]/right[i] (-1 for a leaf), and
    lo[i]/hi[i] bound its points."""
    n, d = points.shape
    # Every leaf holds more than leaf_size // 2 points (it is half of a node of more than leaf_size).
    capacity = 2 * (n // max(1, (leaf_size + 1) // 2) + 1) + 1
    start = np.empty(capacity, np.int64)
    end = np.empty(capacity, np.int64)
    left = np.full(capacity, -1, np.int64)
    right = np.full(capacity, -1, np.int64)
    lo = np.empty((capacity, d), np.float64)
    hi = np.empty((capacity, d), np.float64)
    order = np.arange(n)
    nodes = 1
    start[0], end[0] = 0, n
    pending = np.empty(capacity, np.int64)
    pending[0] = 0
    top = 1
    while top > 0:
        top -= 1
        node = pending[top]
        s, e = start[node], end[node]
        for j in range(d):
            lo[node, j] = np.inf
            hi[node, j] = -np.inf
        for p in range(s, e):
            for j in range(d):
                v = points[order[p], j]
                if v < lo[node, j]:
                    lo[node, j] = v
                if v > hi[node, j]:
                    hi[node, j] = v
        if e - s <= leaf_size:
            continue
        axis, spread = 0, -1.0
        for j in range(d):
            if hi[node, j] - lo[node, j] > spread:
                axis, spread = j, hi[node, j] - lo[node, j]
        if spread <= 0.0:
            continue  # all points identical: a (large) leaf
        middle = (s + e) // 2
        segment = order[s:e]
        ranked = np.argsort(points[segment, axis], kind="mergesort")
        order[s:e] = segment[ranked]
        left[node], right[node] = nodes, nodes + 1
        start[nodes], end[nodes] = s, middle
        start[nodes + 1], end[nodes + 1] = middle, e
        pending[top], pending[top + 1] = nodes, nodes + 1
        top += 2
        nodes += 2
    return order, start[:nodes], end[:nodes], left[:nodes], right[:nodes], lo[:nodes], hi[:nodes]


@njit(cache=True, nogil=True, fastmath=True)
def _box_distance2(q, lo, hi, node, d):
    """Squared distance from q to the node's bounding box (0 inside), branch-free.

    A pruning bound only: fastmath lets the sum vectorise, and the result is shrunk by far more than
    its rounding error so that it stays a lower bound of every exactly computed point distance."""
    total = 0.0
    for j in range(d):
        gap = max(max(lo[node, j] - q[j], q[j] - hi[node, j]), 0.0)
        total += gap * gap
    return total * (1.0 - 1e-9)


@njit(cache=True, nogil=True)
def _query_rows(queries, k, columns, max_leaf, order, start, end, left, right, lo, hi, out_d, out_i):
    d = columns.shape[0]
    buffer = np.empty(max_leaf, np.float64)
    stack_node = np.empty(256, np.int64)
    stack_bound = np.empty(256, np.float64)
    best_d = np.empty(k, np.float64)
    best_i = np.empty(k, np.int64)
    for row in range(queries.shape[0]):
        q = queries[row]
        for t in range(k):
            best_d[t] = np.inf
            best_i[t] = -1
        top = 1
        stack_node[0] = 0
        stack_bound[0] = 0.0
        while top > 0:
            top -= 1
            node = stack_node[top]
            if stack_bound[top] >= best_d[k - 1]:
                continue
            if left[node] < 0:
                s, e = start[node], end[node]
                # Squared distances of the whole leaf first: the loop over points vectorises, and
                # each point still sums its dimensions in order (bit-identical to scikit-learn).
                # (Slices, not offset indexing: numba then drops the negative-index checks and the
                # loop vectorises, 2.5x faster.)
                size = e - s
                leaf = buffer[:size]
                leaf[:] = 0.0
                for j in range(d):
                    qj = q[j]
                    column = columns[j, s:e]
                    for p in range(size):
                        diff = qj - column[p]
                        leaf[p] += diff * diff
                worst = best_d[k - 1]
                below = 0
                for p in range(size):  # most leaves improve nothing: a vectorised count first
                    below += leaf[p] < worst
                if below == 0:
                    continue
                for p in range(size):
                    total = leaf[p]
                    if total < best_d[k - 1]:
                        slot = k - 1
                        while slot > 0 and best_d[slot - 1] > total:
                            best_d[slot] = best_d[slot - 1]
                            best_i[slot] = best_i[slot - 1]
                            slot -= 1
                        best_d[slot] = total
                        best_i[slot] = order[s + p]
                continue
            near, far = left[node], right[node]
            near_bound = _box_distance2(q, lo, hi, near, d)
            far_bound = _box_distance2(q, lo, hi, far, d)
            if far_bound < near_bound:
                near, far = far, near
                near_bound, far_bound = far_bound, near_bound
            if far_bound >= best_d[k - 1]:
                stack_node[top] = near
                stack_bound[top] = near_bound
                top += 1
                continue
            if top + 2 > stack_node.shape[0]:
                stack_node = np.concatenate((stack_node, np.empty_like(stack_node)))
                stack_bound = np.concatenate((stack_bound, np.empty_like(stack_bound)))
            stack_node[top] = far
            stack_bound[top] = far_bound
            stack_node[top + 1] = near
            stack_bound[top + 1] = near_bound
            top += 2
        for t in range(k):
            out_d[row, t] = np.sqrt(best_d[t])
            out_i[row, t] = best_i[t]


@njit(cache=True, nogil=True)
def _leaf_rank(queries, start, left, right, lo, hi):
    """Where each query's descent (always into the nearer child) ends, as that leaf's first
    position in tree order: sorting queries by it makes neighbouring queries share leaves (cache)."""
    d = queries.shape[1]
    rank = np.empty(queries.shape[0], np.int64)
    for row in range(queries.shape[0]):
        q = queries[row]
        node = 0
        while left[node] >= 0:
            if _box_distance2(q, lo, hi, right[node], d) < _box_distance2(q, lo, hi, left[node], d):
                node = right[node]
            else:
                node = left[node]
        rank[row] = start[node]
    return rank


class CompiledKDTree:
    """KD-tree over (n x d) float64 points; `query(x, k)` -> (distances, indices), each row sorted
    by distance, as scikit-learn's KDTree.query returns them (ties possibly in another order)."""

    def __init__(self, points: np.ndarray, leaf_size: int = LEAF_SIZE):
        self.points = np.ascontiguousarray(points, dtype=np.float64)
        if self.points.ndim != 2 or self.points.shape[0] == 0 or not np.isfinite(self.points).all():
            raise ValueError(f"points must be a non-empty, finite (n x d) matrix, got shape {self.points.shape}")
        order, start, end, left, right, lo, hi = _build(self.points, leaf_size)
        # Dimensions x points, in tree order: a leaf is a contiguous run of each column.
        columns = np.ascontiguousarray(self.points[order].T)
        max_leaf = int((end - start)[left < 0].max())
        self._tree = (columns, max_leaf, order, start, end, left, right, lo, hi)

    def query(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest points of each row of x: (distances, indices), both (rows x k). Releases the
        GIL, so threads can query chunks of a batch in parallel."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.points.shape[1]:
            raise ValueError(f"queries must be (rows x {self.points.shape[1]}), got shape {x.shape}")
        if not 1 <= k <= self.points.shape[0]:
            raise ValueError(f"k must be between 1 and the {self.points.shape[0]} training points, got {k}")
        if not np.isfinite(x).all():
            raise ValueError("queries must be finite: found NaN or infinite values")
        columns, max_leaf, order, start, end, left, right, lo, hi = self._tree
        # Queries in tree order: consecutive queries then scan the same leaves, from cache.
        visit = np.argsort(_leaf_rank(x, start, left, right, lo, hi), kind="stable")
        distances = np.empty((x.shape[0], k), np.float64)
        indices = np.empty((x.shape[0], k), np.int64)
        _query_rows(x[visit], k, *self._tree, distances, indices)
        out_d = np.empty_like(distances)
        out_i = np.empty_like(indices)
        out_d[visit] = distances
        out_i[visit] = indices
        return out_d, out_i


# The functions Python calls (`_box_distance2` is compiled into its callers).
_CALLED_FROM_PYTHON = (_build, _query_rows, _leaf_rank)


def compile_ahead() -> dict[str, str]:
    """Compile the tree's functions for the argument types `CompiledKDTree` passes them (dtypes and
    layouts, whatever the data's size), into numba's cache. Returns per function "cached" when its
    machine code came from the cache, else "compiled"."""
    points = np.random.default_rng(0).normal(size=(4 * LEAF_SIZE, 2))
    CompiledKDTree(points).query(points[:8], 3)
    return {
        f.__name__: "cached" if f.stats.cache_hits and not f.stats.cache_misses else "compiled" for f in _CALLED_FROM_PYTHON
    }
