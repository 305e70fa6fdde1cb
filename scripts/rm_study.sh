#!/usr/bin/env bash
# A reward model trained on expert-keyed pairs and scored on other situations of the same test:
# train on the dev half of the emotional-intelligence pairs (52 situations; 10% held out to pick
# the step), stop on held-out accuracy, score the test half (48 other situations) beside the
# baselines. docs/results.md records the figures.
#   pip download --no-deps evals -d /tmp/evals
#   python scripts/prep_ei_pairs.py /tmp/evals/evals-*.whl -o runs/data/ei
#   bash scripts/rm_study.sh            # seed=1 or length_control=true as extra arguments
set -euo pipefail
OUT=${OUT:-runs/pref/ei-rm-s0}
[ -e "$OUT/summary.json" ] || alignforge train examples/rm.yaml \
    dataset=runs/data/ei/dev.jsonl val_size=0.1 max_length=128 max_prompt_length=96 \
    num_train_epochs=3 eval_steps=7 save_steps=7 metric_for_best_model=accuracy \
    early_stopping_patience=4 load_best_model_at_end=true progress=false \
    output_dir="$OUT" "$@"
alignforge eval --task preference --data runs/data/ei/test.jsonl -o "$OUT-test" \
    --max-length 128 --system rm="$OUT/final"
