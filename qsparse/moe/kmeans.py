"""Balanced k-means: ``N`` points into ``E`` clusters of exactly ``N / E`` points each.

MoEfication (2110.01786), D2DMoE (2310.04361) and SSD (2410.03440) all split a feed-forward
layer's ``F`` neurons into equal experts by clustering the L2-normalised rows of its first
weight (here ``gate_proj``). Lloyd iterations with a capacity-constrained assignment step::

    D[i, e] = ||x_i - c_e||²                          [N, E]
    labels  = greedy assignment of the (i, e) pairs in ascending D, each cluster capped at N/E
    c_e     = mean of the points labelled e

The assignment is greedy (a decision: the exact balanced assignment is a min-cost flow; the
references use a constrained solver or an auction step). It is exactly balanced by construction.
Iterations stop when the labels repeat; the labels of the lowest inertia ``Σ_i D[i, label_i]``
seen are returned. ``init_labels`` warm-starts from a previous partition (SSD's re-clustering):
the first centroids are that partition's means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class KMeansResult:
    """``labels``: LongTensor[N] in [0, E); ``centroids``: [E, d] (float32); ``inertia``: the
    sum of squared distances of the points to their centroids; ``iterations`` run."""

    labels: torch.Tensor
    centroids: torch.Tensor
    inertia: float
    iterations: int


def balanced_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
    """Labels [N] for a distance matrix ``dist`` [N, E], at most ``capacity`` points per
    cluster, taking the (point, cluster) pairs in ascending distance (ties: lower flat index)."""
    n, e = dist.shape
    if capacity * e < n:
        raise ValueError(f"{e} clusters of {capacity} cannot hold {n} points")
    labels = np.full(n, -1, dtype=np.int64)
    room = np.full(e, capacity, dtype=np.int64)
    left = n
    for flat in np.argsort(dist, axis=None, kind="stable"):
        i, c = divmod(int(flat), e)
        if labels[i] >= 0 or room[c] == 0:
            continue
        labels[i] = c
        room[c] -= 1
        left -= 1
        if left == 0:
            break
    return labels


def _centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k).astype(np.float64)[:, None]
    return sums / np.maximum(counts, 1.0)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]


def balanced_kmeans(
    x: torch.Tensor,
    n_clusters: int,
    iterations: int = 30,
    init_labels: torch.Tensor | None = None,
    seed: int = 0,
) -> KMeansResult:
    """Cluster the rows of ``x`` [N, d] into ``n_clusters`` equal clusters (module docstring).

    Raises:
        ValueError: ``n_clusters`` does not divide N, or ``init_labels`` is not a balanced
            labelling of N points.
    """
    n = x.shape[0]
    if n_clusters < 1 or n % n_clusters:
        raise ValueError(f"{n_clusters} experts do not divide the {n} neurons evenly")
    size = n // n_clusters
    data = x.detach().double().cpu().numpy()
    if init_labels is not None:
        init = init_labels.detach().cpu().long().numpy()
        counts = np.bincount(init, minlength=n_clusters)
        if init.shape != (n,) or counts.shape[0] != n_clusters or (counts != size).any():
            raise ValueError(f"init_labels must give each of {n_clusters} clusters {size} points")
        centroids = _centroids(data, init, n_clusters)
    else:
        rng = np.random.default_rng(seed)
        centroids = data[rng.choice(n, n_clusters, replace=False)].copy()
    best: tuple[float, np.ndarray] | None = None
    labels = None
    done = 0
    for _ in range(iterations):
        done += 1
        new = balanced_assign(_sq_dist(data, centroids), size)
        centroids = _centroids(data, new, n_clusters)
        inertia = float(_sq_dist(data, centroids)[np.arange(n), new].sum())
        if best is None or inertia < best[0]:
            best = (inertia, new)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
    assert best is not None
    inertia, out = best
    return KMeansResult(
        torch.from_numpy(out),
        torch.from_numpy(_centroids(data, out, n_clusters)).float(),
        inertia,
        done,
    )


def partition_from_labels(labels: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """LongTensor[E, m]: row ``e`` lists the neurons labelled ``e`` in increasing order."""
    order = torch.argsort(labels * labels.numel() + torch.arange(labels.numel()), stable=True)
    return order.view(n_clusters, -1)


def labels_from_partition(experts: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`partition_from_labels`: LongTensor[N] expert of each neuron."""
    e, m = experts.shape
    labels = torch.empty(e * m, dtype=torch.long, device=experts.device)
    labels[experts.flatten()] = torch.arange(e, device=experts.device).repeat_interleave(m)
    return labels
