"""Every command of README.md and docs/guide.md, read from their ```bash blocks and run as written,
top to bottom, in a fresh folder: the docs cannot drift from what the commands do.

What makes them fast, and nothing else changes:

* ``default`` is a tiny random model: this test's ``ALIGNFORGE_CACHE`` holds it where the embedded
  model is converted to, so every command and config naming ``default`` loads it;
* right after ``alignforge examples`` copies the example data, each data file is cut to its first
  ``ROWS`` rows;
* ``SHRINK`` appends options to the commands that would run long (the last value of a key wins);
* the ports in the docs become free ones, and each ``serve`` runs in the background until the end.

A command marked ``# needs GPUs`` or ``# needs runs/demo`` is not run: its ``--help`` must answer
and its configs parse. ``python -m torch.distributed.run`` is run by test_readme_multiprocess.py.
A command of a program not handled here fails the test, so a new kind of command gets handled.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from doc_blocks import ROOT, bash_commands
from multiproc import free_port
from typer.testing import CliRunner

DOCS = ["README.md", "docs/guide.md"]
ROWS = 24
MARKED = re.compile(r"#.*\bneeds (GPUs|runs/demo)\b")
# shorter rows and fewer tokens generated: a step of a tiny model then takes a second
PAIRS = ["max_length=128", "max_prompt_length=64"]
TRAIN_SHRINK = {
    "sft": ["max_steps=1", "max_length=128"],
    "rm": ["max_steps=1", *PAIRS],
    "dpo": ["max_steps=1", *PAIRS],
    "spin": ["max_steps=1", *PAIRS, "num_iterations=1", "beta=0.1", "learning_rate=5e-5",
             "max_samples=8", "max_new_tokens=8"],
    "ppo": ["max_steps=1", "max_length=64", "max_new_tokens=8", "rollout_batch_size=4",
            "mini_batch_size=4", "ppo_epochs=1"],
}  # fmt: skip
SHRINK = {
    ("generate",): ["--max-new-tokens", "8"],
    ("data", "instructions"): ["max_tokens=32", "max_attempts=1"],
    ("data", "preferences"): ["max_samples=8", "k=2", "max_new_tokens=8"],  # 8 pairs to judge
    ("annotate", "export"): ["--ties", "margin0"],  # a random judge calls every pair a tie
    ("eval",): ["--limit", "4", "--max-new-tokens", "8", "--n-boot", "100", "--max-length", "128"],
}


def commands(line: str) -> tuple[list[list[str]], bool]:
    """The commands of a line (``a && b``), and whether it runs in the background (``&``)."""
    words = shlex.split(line, comments=True)
    background = words[-1] == "&"
    cmds, cmd = [], []
    for w in words[:-1] if background else words:
        if w == "&&":
            cmds, cmd = [*cmds, cmd], []
        else:
            cmd.append(w)
    return [*cmds, cmd], background


class Session:
    """A folder where one doc's commands run in order, with the servers they started."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.ports: dict[str, str] = defaultdict(lambda: str(free_port()))
        self.servers: list[tuple[subprocess.Popen, Path]] = []

    def run(self, line: str) -> None:
        cmds, background = commands(line)
        print(f"{'checked' if MARKED.search(line) else 'line'}: {line[:100]}")
        for args in cmds:
            args = self.free_ports(args)
            if MARKED.search(line):
                self.check_marked(args, line)
            elif args[0] == "alignforge" and "serve" in args[1:3]:
                self.serve(args[1:], line)
            elif args[0] == "alignforge":
                self.alignforge(args[1:], line)
            elif args[0] == "make":
                # a source checkout's target: it expands (tests/workflow/test_demo.py runs the demo)
                make = subprocess.run(["make", "-n", *args[1:]], cwd=ROOT, capture_output=True)
                assert make.returncode == 0, f"{line}\n{make.stderr.decode()}"
            elif args[0] == "ruff":  # a development tool: it is installed
                assert subprocess.run(["ruff", "--version"], capture_output=True).returncode == 0
            elif args[:3] == ["python", "-m", "torch.distributed.run"]:
                pass  # run by test_readme_multiprocess.py
            elif args[0] in ("echo", "printf"):
                subprocess.run(["bash", "-c", line], cwd=self.dir, check=True)
            else:
                raise AssertionError(f"no way to run or check {line!r}: add one to this test")
        assert not background or cmds[-1][:2] == ["alignforge", "serve"], line

    def free_ports(self, args: list[str]) -> list[str]:
        """Each port the docs name (``--port 8000``, ``127.0.0.1:8000``) as a free one, the same
        free one each time."""
        out = []
        for i, word in enumerate(args):
            if i and args[i - 1] == "--port":
                word = self.ports[word]
            out.append(re.sub(r"(?<=127\.0\.0\.1:)(\d+)", lambda m: self.ports[m.group(1)], word))
        return out

    def alignforge(self, args: list[str], line: str) -> None:
        from alignforge.cli import app

        extra = SHRINK.get(tuple(args[:2]), SHRINK.get(tuple(args[:1]), []))
        if args[0] == "train" and "--help" not in args:
            extra = TRAIN_SHRINK[yaml.safe_load((self.dir / args[1]).read_text())["stage"]]
        chat = args[0] == "generate" and not {"-p", "--prompt", "--input", "-i"} & set(args)
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, args + extra, input="Hello!\n" if chat else None)
        if res.exit_code != 0:
            tb = "".join(traceback.format_exception(res.exception)) if res.exception else ""
            pytest.fail(f"`{line}` exited {res.exit_code}:\n{res.output[-3000:]}\n{tb[-3000:]}")
        last = (res.output.strip().splitlines() or [""])[-1]
        print(f"    {time.perf_counter() - t0:.1f} s -> {last[:120]}")
        if args[0] == "examples":
            shrink_data(self.dir / (args[1] if len(args) > 1 else "examples") / "data")

    def serve(self, args: list[str], line: str) -> None:
        """Start a server as the docs do and wait until it answers."""
        assert "--port" in args, f"{line}: give the port, so the docs' servers do not collide"
        port = args[args.index("--port") + 1]
        log = self.dir / f"serve-{port}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(log, "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "alignforge.cli", *args], cwd=self.dir,
                                    stdout=fh, stderr=subprocess.STDOUT, env=env)  # fmt: skip
        self.servers.append((proc, log))
        url = f"http://127.0.0.1:{port}/" + ("v1/models" if args[0] == "serve" else "")
        deadline = time.time() + 240
        while time.time() < deadline:
            assert proc.poll() is None, (
                f"`{line}` exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
            try:
                urllib.request.urlopen(url, timeout=2)
                return
            except urllib.error.HTTPError:
                return  # it answers (a login page may refuse us)
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"`{line}` did not answer on {url} within 240 s:\n{log.read_text()[-3000:]}")

    def check_marked(self, args: list[str], line: str) -> None:
        """A command that cannot run here: its options are known and its configs parse."""
        if args[0] in ("torchrun", "accelerate"):
            if "--config_file" in args:
                conf = yaml.safe_load(
                    (self.dir / args[args.index("--config_file") + 1]).read_text()
                )
                assert conf["distributed_type"] == "MULTI_GPU", line
            args = ["alignforge", *args[args.index("alignforge.cli") + 1 :]]
        if args[0] == "python":  # an example script: its --help
            argv = sys.argv
            sys.argv = [args[1], "--help"]
            try:
                with pytest.raises(SystemExit) as done:
                    runpy.run_path(str(self.dir / args[1]), run_name="__main__")
            finally:
                sys.argv = argv
            assert done.value.code == 0, line
            return
        from alignforge.cli import app

        sub = args[1:3] if args[1] in ("data", "annotate") else args[1:2]
        res = CliRunner().invoke(app, [*sub, "--help"])
        assert res.exit_code == 0, f"{line}: --help exited {res.exit_code}\n{res.output}"
        words = [a for a in args[len(sub) + 1 :] if not a.startswith("-")]
        if sub == ["train"]:
            from alignforge.recipes import resolve_stage

            resolve_stage(words[0], words[1:])
        elif sub == ["iterate"]:
            from alignforge.config import load_config
            from alignforge.workflow.config import IterateConfig
            from alignforge.workflow.iterate import validate

            validate(load_config(IterateConfig, words[0], words[1:]))

    def close(self) -> None:
        for proc, _ in self.servers:
            proc.terminate()
        for proc, _ in self.servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def shrink_data(folder: Path) -> None:
    """Each data file cut to its first ROWS rows (JSON lists and JSONL)."""
    for path in folder.iterdir():
        if path.suffix == ".json":
            path.write_text(json.dumps(json.loads(path.read_text())[:ROWS]))
        elif path.suffix == ".jsonl":
            path.write_text("".join(path.read_text().splitlines(keepends=True)[:ROWS]))


@pytest.fixture()
def tiny_default(tmp_path, tiny_model_dir, monkeypatch):
    """``default`` is a tiny model, sitting where the embedded model is converted to. Its layers
    are 64 wide, the block size of bitsandbytes' 4-bit weights (QLoRA), which 32 is not, and it
    reads 4096 tokens: its small vocabulary spells a judge's prompt in over 1024."""
    from tiny import make_model
    from transformers import AutoTokenizer

    from alignforge.models.loading import DEFAULT_DIRNAME

    cache = tmp_path / "cache"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    make_model(cache / "models" / DEFAULT_DIRNAME, tokenizer, hidden=64, context=4096)
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(cache))
    return cache


@pytest.mark.timeout(900)
@pytest.mark.parametrize("doc", DOCS)
def test_every_command_of_the_doc_runs_as_written(doc, tiny_default, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    session = Session(work)
    try:
        for line in bash_commands(doc):
            session.run(line)
    finally:
        session.close()


def test_the_guide_shows_the_shipped_config_as_it_is():
    """A config the guide shows under its path (`examples/x.yaml`:) is that file, verbatim."""
    text = (ROOT / "docs/guide.md").read_text()
    shown = re.findall(r"`(examples/[\w/.-]+\.yaml)`:\n\n```yaml\n(.*?)```", text, flags=re.S)
    assert [path for path, _ in shown] == ["examples/sft_default.yaml"]
    for path, content in shown:
        assert content == (ROOT / path).read_text(), f"docs/guide.md shows another {path}"
