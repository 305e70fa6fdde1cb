import numpy as np
import pytest

from alignforge.datagen.diversity import (
    CutoffStats,
    build_index,
    choose_cutoff,
    components,
    diversity_sample,
    embed_texts,
    exact_knn,
    greedy_near_dup_filter,
    knn_graph,
    write_diagnostics,
)


def clustered(n_clusters=30, per=15, n_outliers=25, dim=64, noise=0.12, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_clusters), per)
    x = centers[truth] + rng.normal(scale=noise / np.sqrt(dim), size=(len(truth), dim))
    out = rng.normal(size=(n_outliers, dim))
    x = np.vstack([x, out / np.linalg.norm(out, axis=1, keepdims=True)])
    truth = np.r_[truth, n_clusters + np.arange(n_outliers)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


def test_components_of_a_hand_built_graph():
    # 0-1 strong, 1-2 weak, 3 alone; k=1 neighbour lists
    neighbors = np.array([[1], [0], [1], [0]])
    sims = np.array([[0.9], [0.9], [0.6], [0.1]])
    assert components(neighbors, sims, 0.5).tolist() == [0, 0, 0, 1]
    labels = components(neighbors, sims, 0.8)
    assert labels[0] == labels[1] != labels[2] != labels[3]


def test_cutoff_rule_picks_no_giant_with_fewest_isolated():
    stats = [CutoffStats(0.5, 2, 95, 0), CutoffStats(0.6, 10, 60, 1), CutoffStats(0.7, 30, 20, 4),
             CutoffStats(0.8, 60, 8, 25), CutoffStats(0.9, 95, 2, 90)]  # fmt: skip
    assert choose_cutoff(stats, 100, giant_fraction=0.5) == 0.7
    assert choose_cutoff(stats, 100, giant_fraction=0.7) == 0.6
    assert choose_cutoff(stats, 100, giant_fraction=0.01) == 0.9  # none admissible: highest


def test_one_representative_per_component_on_clustered_data():
    x, truth = clustered()
    result = diversity_sample(x, k=10, n_trees=8)
    labels = result.labels
    # every component yields exactly one representative
    assert sorted(labels[result.selected].tolist()) == list(range(labels.max() + 1))
    assert len(set(labels[result.selected])) == len(result.selected)
    # the automatic cutoff recovers the planted structure: 30 clusters + 25 outliers
    assert len(result.selected) == 55
    for c in range(30):
        assert len(set(labels[truth == c])) == 1
    assert len(set(labels[truth >= 30])) == 25
    largest = max(np.bincount(labels))
    assert largest <= 0.5 * len(x)
    sweep = {s.threshold: s for s in result.sweep}
    assert sweep[min(sweep)].largest >= sweep[max(sweep)].largest  # looser cutoffs merge more


def test_fixed_threshold_and_tiny_inputs():
    x, _ = clustered(n_clusters=3, per=5, n_outliers=0)
    everything = diversity_sample(x, k=5, threshold=-1.0)
    assert len(everything.selected) == 1
    assert diversity_sample(x[:1]).selected == [0]


def test_annoy_recall_against_exact_search():
    x, _ = clustered(n_clusters=50, per=40, n_outliers=0, noise=0.8)
    index = build_index(x, n_trees=16)
    neighbors, sims = knn_graph(index, len(x), k=10, search_k=2000)
    exact = exact_knn(x, np.arange(len(x)), 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(neighbors, exact, strict=True)])
    assert recall >= 0.9
    assert np.allclose(sims[:, 0], np.einsum("ij,ij->i", x, x[neighbors[:, 0]]), atol=1e-4)


def test_near_dup_filter_keeps_first_of_each_group():
    x, truth = clustered(n_clusters=4, per=3, n_outliers=2, noise=0.05)
    kept = greedy_near_dup_filter(x, 0.95)
    assert kept == [0, 3, 6, 9, 12, 13]


def test_diagnostics_and_real_embeddings(tmp_path):
    texts = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Stock markets fell sharply today.",
             "Shares dropped steeply on the stock market today.", "Photosynthesis converts light into energy."]  # fmt: skip
    emb = embed_texts(texts, progress=False)
    assert emb.shape == (5, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[2, 3] > sim[2, 4] + 0.3
    result = diversity_sample(emb, k=2, threshold=0.6)
    assert len(result.selected) == 3
    files = write_diagnostics(result, texts, tmp_path)
    for path in files.values():
        assert (tmp_path / path.rsplit("/", 1)[-1]).stat().st_size > 0
    assert "cat" in (tmp_path / "pairs_near_cutoff.md").read_text()


@pytest.mark.parametrize("bad", [[], ["only one"]])
def test_cli_diversity(tmp_path, bad):
    import json

    from typer.testing import CliRunner

    from alignforge.datagen.cli import app

    path = tmp_path / "in.jsonl"
    rows = [
        {"id": i, "text": t}
        for i, t in enumerate(["a cat on a mat", "a cat on the mat", "stock prices fell"] + bad)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = CliRunner().invoke(
        app, ["diversity", str(path), "-o", str(tmp_path / "out"), "--k", "2", "--threshold", "0.9"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "cutoff_sweep.png").exists()
    assert len((tmp_path / "out" / "selected.jsonl").read_text().splitlines()) == 2 + len(bad)
