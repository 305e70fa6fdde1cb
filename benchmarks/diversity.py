"""Diversity sampling at scale: speed and recall of the Annoy kNN graph, embedding throughput.

    python benchmarks/diversity.py                       # 100,000 synthetic items + real corpus
    python benchmarks/diversity.py --n 20000 --search-k 400 --json runs/bench_diversity.json

Part 1 times index build, kNN graph, cutoff sweep and components on ``--n`` synthetic clustered
unit vectors (384 dims, like all-MiniLM-L6-v2) and measures recall@10 of the Annoy neighbours
against exact cosine search on ``--queries`` random items. Part 2 embeds
examples/data/wikipedia_paragraphs.jsonl with the bundled all-MiniLM-L6-v2, once through plain
``SentenceTransformer.encode`` and once through ``alignforge.datagen.diversity.embed_texts``,
and compares throughput (best of ``--repeats``), then runs the diversity sampler on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def synthetic(n: int, dim: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Near-duplicate clusters (about n / n_clusters members, within-cluster cosine ~0.85-0.92)
    plus 5% scattered items, unit-normalised."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    n_scatter = n // 20
    labels = rng.integers(0, n_clusters, n - n_scatter)
    spread = rng.uniform(0.3, 0.4, n_clusters).astype(np.float32)
    x = (
        centers[labels]
        + rng.normal(size=(len(labels), dim)).astype(np.float32) * spread[labels, None]
    )
    x = np.vstack([x, rng.normal(size=(n_scatter, dim)).astype(np.float32)])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_graph(args) -> dict:
    from alignforge.datagen.diversity import (
        DEFAULT_THRESHOLDS,
        build_index,
        choose_cutoff,
        components,
        exact_knn,
        knn_graph,
        representatives,
        sweep_cutoffs,
    )

    x = synthetic(args.n, 384, args.clusters)
    t0, c0 = time.perf_counter(), time.process_time()
    index = build_index(x, args.n_trees, n_jobs=args.workers)
    t1, c1 = time.perf_counter(), time.process_time()
    neighbors, sims = knn_graph(index, len(x), args.k, args.search_k, workers=args.workers)
    t2, c2 = time.perf_counter(), time.process_time()
    sweep = sweep_cutoffs(neighbors, sims, DEFAULT_THRESHOLDS)
    cut = choose_cutoff(sweep, len(x))
    labels = components(neighbors, sims, cut)
    selected = representatives(x, labels)
    t3, c3 = time.perf_counter(), time.process_time()
    # CPU seconds do not grow when other processes share the cores; on idle cores the two
    # threaded phases take about cpu / workers of wall time, the sweep about its cpu time.
    idle_estimate = (c1 - c0) / args.workers + (c2 - c1) / args.workers + (c3 - c2)
    rng = np.random.default_rng(1)
    queries = rng.choice(len(x), args.queries, replace=False)
    exact = exact_knn(x, queries, args.k)
    recall = float(
        np.mean([len(set(exact[i]) & set(neighbors[q])) / args.k for i, q in enumerate(queries)])
    )
    return {"n": len(x), "n_trees": args.n_trees, "search_k": args.search_k, "k": args.k,
            "build_s": t1 - t0, "knn_s": t2 - t1, "sweep_components_s": t3 - t2, "total_s": t3 - t0,
            "build_cpu_s": c1 - c0, "knn_cpu_s": c2 - c1, "sweep_cpu_s": c3 - c2,
            "idle_2core_estimate_s": idle_estimate, "load_avg_1min": os.getloadavg()[0],
            "recall_at_k": recall, "cutoff": cut, "components": len(selected)}  # fmt: skip


def bench_embedding(args) -> dict:
    from sentence_transformers import SentenceTransformer

    from alignforge.datagen.diversity import default_embedder_path, diversity_sample, embed_texts

    with open(args.corpus, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh if line.strip()]
    model = SentenceTransformer(default_embedder_path(), device="cpu")
    model.encode(texts[:64], batch_size=args.batch_size)  # warm-up
    plain, ours, plain_cpu, ours_cpu = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so both see the same background load
        t, c = time.perf_counter(), time.process_time()
        ref = model.encode(texts, batch_size=args.batch_size, normalize_embeddings=True)
        plain.append(time.perf_counter() - t)
        plain_cpu.append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        emb = embed_texts(texts, model, batch_size=args.batch_size, progress=False)
        ours.append(time.perf_counter() - t)
        ours_cpu.append(time.process_time() - c)
    assert np.allclose(ref, emb, atol=1e-5)
    result = diversity_sample(emb, k=10, n_trees=args.n_trees, search_k=args.search_k)
    return {"texts": len(texts), "plain_texts_per_s": len(texts) / min(plain),
            "ours_texts_per_s": len(texts) / min(ours), "ratio": min(plain) / min(ours),
            "plain_texts_per_cpu_s": len(texts) / min(plain_cpu),
            "ours_texts_per_cpu_s": len(texts) / min(ours_cpu), "cpu_ratio": min(plain_cpu) / min(ours_cpu),
            "corpus_cutoff": result.threshold, "corpus_components": len(result.selected)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--clusters", type=int, default=5000)
    p.add_argument("--n-trees", type=int, default=16)
    p.add_argument("--search-k", type=int, default=600)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--corpus", default="examples/data/wikipedia_paragraphs.jsonl")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--json", default=None, help="Also write the figures to this JSON file.")
    args = p.parse_args()
    graph = bench_graph(args)
    print(f"\nkNN graph on {graph['n']:,} synthetic items (384 dims), {os.cpu_count()} CPUs")
    print(
        "| n_trees | search_k | build s | kNN s | sweep+components s | total s | recall@10 | cutoff | components |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {graph['n_trees']} | {graph['search_k']} | {graph['build_s']:.1f} | {graph['knn_s']:.1f} | "
          f"{graph['sweep_components_s']:.1f} | {graph['total_s']:.1f} | {graph['recall_at_k']:.3f} | "
          f"{graph['cutoff']:.2f} | {graph['components']:,} |")  # fmt: skip
    out = {"graph": graph}
    if not args.skip_embedding:
        emb = bench_embedding(args)
        out["embedding"] = emb
        print(
            f"\nEmbedding {emb['texts']} paragraphs with all-MiniLM-L6-v2 (batch {args.batch_size}, best of {args.repeats})"
        )
        print(
            "| plain encode texts/s (per CPU-s) | embed_texts texts/s (per CPU-s) | wall ratio | CPU ratio | corpus cutoff | components |"
        )
        print("|---|---|---|---|---|---|")
        print(f"| {emb['plain_texts_per_s']:.1f} ({emb['plain_texts_per_cpu_s']:.1f}) | "
              f"{emb['ours_texts_per_s']:.1f} ({emb['ours_texts_per_cpu_s']:.1f}) | {emb['ratio']:.3f} | "
              f"{emb['cpu_ratio']:.3f} | {emb['corpus_cutoff']:.2f} | {emb['corpus_components']} |")  # fmt: skip
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
