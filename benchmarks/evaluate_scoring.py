"""Cost of the extraction reward and of a full evaluation with bootstrap CIs on ner_finance.

    python benchmarks/evaluate_scoring.py

Predictions are the gold answers wrapped in a ```json fence (so parsing is exercised); the
reward must be 1.0 everywhere and F1 exactly 1.0.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignforge.evaluate.tasks import get_task, load_ner_finance  # noqa: E402


def main() -> None:
    task = get_task("extraction")
    rows = load_ner_finance("examples/data/ner_finance.jsonl")
    refs = [r["reference"] for r in rows]
    preds = ["```json\n" + json.dumps(r) + "\n```" for r in refs]
    t = time.perf_counter()
    rewards = task.rewards(preds, refs)
    dt = time.perf_counter() - t
    print(
        f"reward(): {len(preds)} items in {dt:.2f} s = {1e3 * dt / len(preds):.2f} ms/item, "
        f"mean reward {sum(rewards) / len(rewards):.3f}"
    )
    t = time.perf_counter()
    res = task.evaluate(preds, refs, n_boot=2000)
    dt = time.perf_counter() - t
    print(
        f"evaluate(): {len(preds)} items, {len(res.metrics)} metrics x 2000 bootstrap "
        f"resamples in {dt:.2f} s; f1 {res.metrics['f1'].fmt()}"
    )


if __name__ == "__main__":
    main()
