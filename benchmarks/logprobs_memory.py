"""Peak memory and time of per-token log-probs: selective_log_softmax vs log_softmax + gather.

    python benchmarks/logprobs_memory.py --batch 4 --seq 512 --vocab 32000

Each method runs in a fresh subprocess; peak resident memory (ru_maxrss) is reported above the
baseline after the logits are allocated, so the figure is the extra memory the method needs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
torch.manual_seed(0)
b, t, v, method = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
logits = torch.randn(b, t, v)
index = torch.randint(0, v, (b, t))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if method == "selective":
    from alignforge.losses.logprobs import selective_log_softmax
    out = selective_log_softmax(logits, index)
else:
    out = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"method": method, "extra_mib": (peak - base) / 1024, "seconds": elapsed}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    print(f"logits (B={args.batch}, T={args.seq}, V={args.vocab}) fp32: {logits_mib:.0f} MiB")
    for method in ("log_softmax+gather", "selective"):
        cmd = [sys.executable, "-c", CHILD, str(args.batch), str(args.seq), str(args.vocab), method]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"{method:>20}: +{result['extra_mib']:.0f} MiB peak, {result['seconds']:.2f} s")


if __name__ == "__main__":
    main()
