"""GGUF for llama.cpp and Ollama (f16, q8_0, q4_0, q4_k_m), tokenizer and chat template inside.

    alignforge export runs/ppo/final -o runs/export/model-q4_k_m.gguf --format gguf --quant q4_k_m
    ollama create mymodel -f Modelfile     # Modelfile: FROM ./model-q4_k_m.gguf

Both steps are llama.cpp's own tools, not a re-implementation of the format:

1. ``convert_hf_to_gguf.py`` turns the merged HF directory into a GGUF (f16 directly, f32 as the
   intermediate of a quantized type). llama-cpp-python ships llama.cpp compiled but not this
   script, so the script (with its ``conversion/`` and ``gguf-py/`` packages) is taken once from
   the source distribution of the installed llama-cpp-python version and kept under the cache:
   converter and quantizer come from the same llama.cpp commit.
2. ``llama_model_quantize`` (the library call behind ``llama-quantize``) writes q8_0, q4_0 or
   q4_k_m from the f32 file. Quantizing from f32 rounds the weights once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from alignforge.errors import UserError

GGUF_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")
# llama.cpp's file types (``llama_ftype``) for the quantized outputs
_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
           "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # fmt: skip
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
INSTALL_HINT = "pip install 'alignforge[gguf]'"
# refuse links and paths leaving the folder (Python >= 3.11.4; older ones extract as before)
_SAFE = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


class ExportError(UserError, RuntimeError):
    """An export step failed; the message names the step and the file."""

    exit_code = 1


def llama_cpp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise ExportError(
            f"GGUF export and evaluation need llama-cpp-python: {INSTALL_HINT}"
        ) from None


def converter_script(cache: str | Path | None = None) -> Path:
    """``convert_hf_to_gguf.py`` of the installed llama-cpp-python's llama.cpp, fetched once."""
    from alignforge.models import cache_dir

    version = llama_cpp_version()
    root = cache_dir(cache) / "llama.cpp" / version
    script = root / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", tmp, f"llama-cpp-python=={version}"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise ExportError(
                f"could not fetch llama.cpp's converter: `{' '.join(cmd)}` "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
            )
        staging = Path(tempfile.mkdtemp(dir=_mkdir(root.parent), prefix=".fetch-"))
        _extract_converter(sdists[0], staging)
    if not (staging / script.name).exists():
        shutil.rmtree(staging)
        raise ExportError(f"{sdists[0].name} holds no vendor/llama.cpp/{script.name}")
    try:
        os.replace(staging, root)
    except OSError:  # another process extracted it first
        shutil.rmtree(staging)
    return script


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _extract_converter(sdist: Path, dest: Path) -> None:
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts  # llama_cpp_python-X/vendor/llama.cpp/<part>/...
            if parts[1:3] == ("vendor", "llama.cpp") and len(parts) > 3:
                if parts[3] in _CONVERTER_PARTS and (member.isfile() or member.isdir()):
                    member.name = str(Path(*parts[3:]))
                    tar.extract(member, dest, **_SAFE)


def convert_hf_to_gguf(model_dir: str | Path, output: str | Path, outtype: str,
                       cache: str | Path | None = None) -> Path:  # fmt: skip
    """Run llama.cpp's converter on an HF directory; ``outtype`` is f32, f16, bf16 or q8_0."""
    cmd = [sys.executable, str(converter_script(cache)), str(model_dir),
           "--outfile", str(output), "--outtype", outtype]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not Path(output).exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise ExportError(
            f"convert_hf_to_gguf.py {model_dir} failed (exit {proc.returncode}):\n{tail}"
        )
    return Path(output)


def quantize_gguf(source: str | Path, output: str | Path, quant: str, threads: int = 0) -> Path:
    """``llama_model_quantize`` from an f32/f16 GGUF to ``quant`` (q8_0, q4_0 or q4_k_m)."""
    if quant not in _FTYPES:
        raise ValueError(f"quantize: {quant!r} is not one of {', '.join(_FTYPES)}")
    llama_cpp_version()
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[quant])
    params.nthread = threads
    log = Path(f"{output}.log")
    with _native_output_to(log):  # a line per tensor, printed from C
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(output).encode(), ctypes.byref(params)
        )
    lines = log.read_text(errors="replace").splitlines()
    log.unlink()
    if rc != 0 or not Path(output).exists():
        tail = "\n".join(lines[-8:])
        raise ExportError(f"llama_model_quantize {source} -> {quant} failed ({rc}):\n{tail}")
    return Path(output)


@contextlib.contextmanager
def _native_output_to(path: Path):
    """Send file descriptors 1 and 2 (what C code prints, past Python's sys.stdout) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def export_gguf(model: str, output: str | Path, quant: str = "q4_k_m",
                cache: str | Path | None = None, threads: int = 0) -> Path:  # fmt: skip
    """Write ``model`` (adapter dir, HF model dir or ``default``) as a GGUF file of type ``quant``.

    An adapter is merged into its base at float32 first. Next to the file, ``<output>.json``
    records the source, its fingerprint, the type, the llama.cpp version and the size.
    """
    from alignforge.export.hf import export_hf
    from alignforge.models import fingerprint, is_adapter_dir, resolve_model_path

    if quant not in GGUF_QUANTS:
        raise ValueError(f"--quant {quant}: expected one of {', '.join(GGUF_QUANTS)}")
    output = Path(output)
    if output.suffix != ".gguf":
        raise ValueError(f"--output {output}: a GGUF export is one file ending in .gguf")
    converter_script(cache)  # fail early, before merging, when llama-cpp-python is missing
    path = resolve_model_path(model, cache)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=_mkdir(output.parent), prefix=".export-") as tmp:
        hf_dir = Path(path)
        if is_adapter_dir(path):
            hf_dir = export_hf(path, Path(tmp) / "merged", dtype="float32", cache=cache)
        partial = Path(tmp) / output.name
        if quant == "f16":
            convert_hf_to_gguf(hf_dir, partial, "f16", cache)
        else:
            f32 = convert_hf_to_gguf(hf_dir, Path(tmp) / "model-f32.gguf", "f32", cache)
            quantize_gguf(f32, partial, quant, threads)
        os.replace(partial, output)
    record = {"source": str(model), "source_fingerprint": fingerprint(path), "format": "gguf",
              "quant": quant, "llama_cpp_python": llama_cpp_version(),
              "bytes": output.stat().st_size, "seconds": round(time.perf_counter() - start, 1),
              "tensor_types": tensor_types(output)}  # fmt: skip
    Path(f"{output}.json").write_text(json.dumps(record, indent=1))
    return output


def tensor_types(path: str | Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. ``{"Q4_0": 210, "F32": 61}``:
    what a 4-bit export really is once llama.cpp's fallbacks are counted."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).most_common())
