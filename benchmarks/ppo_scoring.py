"""PPO's policy pass: vocabulary logits at every position vs on the answer tokens only.

    python benchmarks/ppo_scoring.py                                  # demo-shaped batch
    python benchmarks/ppo_scoring.py --prompt-tokens 400 --answer-tokens 64 --repeats 5

One mini-batch as PPO trains it: ``--batch`` sequences of ``--prompt-tokens`` prompt and
``--answer-tokens`` answer tokens on the embedded default model with a LoRA policy (rank 16, every
linear layer). Each variant runs forward + backward of the answer tokens' log-probs:

* ``full``: ``alignforge.recipes.ppo.token_logps`` without a response mask: the model's own
  forward, logits ``(B, L, V)`` at every position (what the PPO recipe did before), kept at the
  answer positions;
* ``answers``: the same function with the response mask, i.e. the decoder once and the LM head
  on the answer positions alone.

Both give the same log-probs (checked here). Prints the median seconds of ``--repeats`` runs after
one warm-up and the ratio; writes ``benchmarks/results/ppo_scoring.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--prompt-tokens", type=int, default=124, help="the demo's mean extraction prompt"
    )
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from alignforge.models import load_model
    from alignforge.recipes.ppo import token_logps

    torch.manual_seed(0)
    model = get_peft_model(
        load_model("default"), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    )
    B, P, A = args.batch, args.prompt_tokens, args.answer_tokens
    L = P + A
    ids = torch.randint(0, model.config.vocab_size, (B, L))
    mask = torch.zeros(B, L - 1)
    mask[:, P - 1 :] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, L, dtype=torch.long), "mask": mask}

    def full():  # no mask: the model's own forward, logits at every position
        return token_logps(model, {k: v for k, v in batch.items() if k != "mask"}, 1.0) * mask

    def answers():
        return token_logps(model, batch, 1.0)

    with torch.no_grad():
        torch.testing.assert_close(full(), answers(), rtol=1e-4, atol=1e-4)
    seconds = {}
    for name, fn in (("full", full), ("answers", answers)):
        times = []
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            fn().sum().backward()
            model.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
        seconds[name] = statistics.median(times[1:])
    ratio = seconds["full"] / seconds["answers"]
    result = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "speedup": ratio,
    }
    out = ROOT / "benchmarks/results/ppo_scoring.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{B} x ({P} prompt + {A} answer) tokens, forward + backward, median of {args.repeats}:")
    print(f"  logits at every position: {seconds['full']:.2f} s")
    print(f"  LM head on answers only : {seconds['answers']:.2f} s   (x{ratio:.2f})")


if __name__ == "__main__":
    main()
