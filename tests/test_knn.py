"""The compiled KD-tree answers exactly what scikit-learn's KDTree (hdbscan's neighbour index) does:
the same distances to the last bit and the same neighbours wherever distances differ."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KDTree

from segspark.models.deep.knn import CompiledKDTree


def _clustered(seed: int, rows: int, dims: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, size=(5, dims))
    return centres[rng.integers(0, 5, rows)] + rng.normal(0.0, 1.0, size=(rows, dims))


@pytest.mark.parametrize("dims, leaf_size, k", [(8, 64, 12), (8, 4, 20), (3, 16, 1), (1, 8, 5), (12, 64, 7)])
def test_same_neighbours_and_bit_identical_distances(dims, leaf_size, k):
    points, queries = _clustered(0, 3000, dims), _clustered(1, 700, dims)
    distances, indices = CompiledKDTree(points, leaf_size).query(queries, k)
    expected_distances, expected_indices = KDTree(points, leaf_size=40).query(queries, k=k)
    assert np.array_equal(distances, expected_distances)
    assert np.array_equal(indices, expected_indices)  # continuous data: no ties
    assert distances.dtype == np.float64 and indices.shape == (700, k)


def test_duplicated_points_give_the_same_distances_and_sets():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 4, size=(400, 3)).astype(float)  # a grid: many equal distances
    points = np.vstack([base, base[:100]])
    queries = rng.integers(0, 4, size=(200, 3)) + rng.choice([0.0, 0.5], size=(200, 3))
    distances, indices = CompiledKDTree(points).query(queries, 15)
    expected_distances, _ = KDTree(points).query(queries, k=15)
    assert np.array_equal(distances, expected_distances)
    # Neighbours are true neighbours: recomputed distances match, each row has distinct points.
    recomputed = np.sqrt(((points[indices] - queries[:, None, :]) ** 2).sum(axis=2))
    assert np.allclose(recomputed, distances, rtol=0, atol=1e-12)
    assert all(len(set(row)) == 15 for row in indices)


def test_all_points_identical_and_k_equal_to_n():
    points = np.ones((50, 4))
    distances, indices = CompiledKDTree(points, leaf_size=8).query(np.zeros((3, 4)), 50)
    assert np.allclose(distances, 2.0) and sorted(indices[0]) == list(range(50))


def test_query_points_in_the_training_set_find_themselves():
    points = _clustered(3, 2000, 8)
    distances, indices = CompiledKDTree(points).query(points[::7], 1)
    assert (distances[:, 0] == 0.0).all() and (indices[:, 0] == np.arange(0, 2000, 7)).all()


def test_empty_batch_and_bad_arguments():
    tree = CompiledKDTree(_clustered(4, 100, 8))
    distances, indices = tree.query(np.empty((0, 8)), 3)
    assert distances.shape == (0, 3) and indices.shape == (0, 3)
    with pytest.raises(ValueError, match="k must be between 1 and the 100 training points, got 101"):
        tree.query(np.zeros((1, 8)), 101)
    with pytest.raises(ValueError, match=r"queries must be \(rows x 8\)"):
        tree.query(np.zeros((2, 3)), 1)
    with pytest.raises(ValueError, match="queries must be finite"):
        tree.query(np.full((1, 8), np.nan), 1)
    with pytest.raises(ValueError, match="points must be a non-empty, finite"):
        CompiledKDTree(np.empty((0, 8)))


def test_threads_querying_one_tree_get_the_single_threaded_answer():
    from concurrent.futures import ThreadPoolExecutor

    points, queries = _clustered(5, 5000, 8), _clustered(6, 4000, 8)
    tree = CompiledKDTree(points)
    expected = tree.query(queries, 10)
    with ThreadPoolExecutor(max_workers=4) as pool:
        parts = list(pool.map(lambda chunk: tree.query(chunk, 10), np.array_split(queries, 8)))
    assert np.array_equal(np.vstack([p[0] for p in parts]), expected[0])
    assert np.array_equal(np.vstack([p[1] for p in parts]), expected[1])
