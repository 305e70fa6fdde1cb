"""What a user sees when they get something wrong: the CLI exits non-zero with one or two lines
that name the file, row or field (no traceback); ``--debug`` shows the traceback.

Every case runs ``alignforge.cli.main`` in this process (its one handler is what is tested),
except ``--debug``, which runs the real command in a subprocess to see the traceback.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from alignforge import cli

ROOT = Path(__file__).resolve().parents[2]


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """``alignforge ARGS`` through ``cli.main``: (exit code, stderr)."""
    monkeypatch.delenv("ALIGNFORGE_DEBUG", raising=False)  # restored after the test
    monkeypatch.setattr(sys, "argv", ["alignforge", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


def assert_short(code: int, err: str, *needles: str) -> None:
    """Non-zero exit, at most three lines on stderr, no traceback, every needle named."""
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert 0 < len(lines) <= 3, err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jsonl(path: Path, lines: list) -> Path:
    """Write ``lines`` (dicts as JSON, strings as they are) one per line."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def good(i: int) -> dict:
    return {"prompt": f"question {i}", "completion": f"answer {i}"}


@pytest.fixture
def sft_config(tiny_model_dir, tmp_path):
    """``train`` arguments: an SFT config on the tiny model, plus overrides."""
    cfg = {"stage": "sft", "model_name_or_path": tiny_model_dir, "dataset": "unset",
           "output_dir": str(tmp_path / "run"), "max_length": 64, "max_steps": 2,
           "per_device_train_batch_size": 2, "progress": False}  # fmt: skip
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return lambda *overrides: ["train", str(path), *overrides]


# ---- data rows: the file and its line ------------------------------------------------------


def test_malformed_json_line_is_named_by_its_line(sft_config, tmp_path, monkeypatch, capsys):
    rows = [good(i) for i in range(3)] + [""] + [good(i) for i in range(3, 6)]
    data = jsonl(tmp_path / "malformed.jsonl", [*rows, '{"prompt": "x", ', good(9)])
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={data}"))
    assert_short(code, err, f"{data}:8: not valid JSON")


def test_missing_column_and_wrong_type_name_the_file_line(
    sft_config, tmp_path, monkeypatch, capsys
):
    """A blank line before the bad row: the line number is the file's, not the row index."""
    rows = [good(i) for i in range(4)] + ["", good(4), {"prompt": "no answer"}, good(6)]
    data = jsonl(tmp_path / "missing.jsonl", rows)
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={data}"))
    assert_short(code, err, f"{data}:7:", "completion")
    rows[6] = {"messages": "hello"}
    data = jsonl(tmp_path / "types.jsonl", rows)
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={data}"))
    assert_short(code, err, f"{data}:7:", "messages")


def test_generate_names_a_bad_input_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}, "", {"question": "hi"}])
    code, err = run_main(monkeypatch, capsys, "generate", tiny_model_dir, "--input", str(data))
    assert_short(code, err, f"{data}:3:", "`prompt` or `messages`")


def test_a_held_out_row_is_named_by_its_file_line(sft_config, tmp_path, monkeypatch, capsys):
    """val_size holds rows out at random; a bad one among them is named by its line in the
    file, not by its place in the held-out split."""
    from alignforge.recipes.common import load_splits

    rows = [good(i) for i in range(20)]
    probe = jsonl(tmp_path / "probe.jsonl", rows)
    train, held = load_splits([str(probe)], [], 0.2, 42, None)
    line = int(held.where(len(held) - 1).rsplit(":", 1)[1])  # the last held-out row's line
    assert f"{probe}:{line}" not in {train.where(i) for i in range(len(train))}
    rows[line - 1] = {"prompt": "no answer"}
    data = jsonl(tmp_path / "held.jsonl", rows)
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={data}", "val_size=0.2"))
    assert_short(code, err, f"{data}:{line}:")


def test_json_and_parquet_rows_are_named_by_their_index(sft_config, tmp_path, monkeypatch, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [good(i) for i in range(5)]
    rows[3] = {"prompt": "no answer", "completion": None}
    data = tmp_path / "rows.json"
    data.write_text(json.dumps(rows))
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={data}"))
    assert_short(code, err, f"{data} row 3:")
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), table)
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={table}"))
    assert_short(code, err, f"{table} row 3:")


# ---- files, models, config -----------------------------------------------------------------


def test_missing_files_are_named(sft_config, tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={tmp_path}/nope.jsonl"))
    assert_short(code, err, "dataset", "nope.jsonl", "no such file")
    code, err = run_main(monkeypatch, capsys, "train", str(tmp_path / "nope.yaml"))
    assert_short(code, err, "nope.yaml", "does not exist")


def test_missing_or_invalid_models_are_named(sft_config, tmp_path, monkeypatch, capsys):
    data = jsonl(tmp_path / "d.jsonl", [good(i) for i in range(4)])
    for model, why in [
        (tmp_path / "runs" / "sft" / "final", "no such file or directory"),
        (tmp_path, "holds no config.json"),  # a folder, not a model
        ("nobody-here/no-such-model", "not in the Hugging Face cache"),  # offline (conftest)
    ]:
        code, err = run_main(
            monkeypatch, capsys, *sft_config(f"dataset={data}", f"model_name_or_path={model}")
        )
        assert_short(code, err, f"model_name_or_path={model}", why)
    assert "Repo id must be in the form" not in err


def test_unknown_key_names_the_closest_and_where_to_see_all(sft_config, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, *sft_config("learning_rat=1e-4"))
    assert_short(code, err, "learning_rat: unknown key", "did you mean learning_rate",
                 "alignforge train --help stage=sft")  # fmt: skip
    assert "per_device_eval_batch_size" not in err  # not the whole list


def test_bad_value_names_the_field(sft_config, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, *sft_config("learning_rate=-1"))
    assert_short(code, err, "learning_rate", "greater than 0", "-1")


def test_unreachable_endpoint_is_named(tmp_path, monkeypatch, capsys):
    project = tmp_path / "ann"
    assert run_main(monkeypatch, capsys, "annotate", "init", str(project))[0] in (0, None)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    code, err = run_main(monkeypatch, capsys, "annotate", "judge", str(project),
                         "--base-url", url, "--model", "m")  # fmt: skip
    assert_short(code, err, f"--base-url {url}", "cannot connect")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["data", "chunk", "{tmp}/nope.jsonl", "-o", "{tmp}/c.jsonl"], "nope.jsonl"),
        (["annotate", "stats", "{tmp}/no-project"], "no-project"),
        (["eval", "--data", "{tmp}/nope.jsonl", "-o", "{tmp}/ev", "--model", "{model}"],
         "nope.jsonl"),
        (["report", "{tmp}/no-run"], "no-run"),
        (["serve", "{tmp}/no-model"], "no-model"),
        (["export", "{tmp}/no-model", "-o", "{tmp}/m.gguf"], "no-model"),
        (["iterate", "{tmp}/nope.yaml"], "nope.yaml"),
        (["merge", "{tmp}/no-adapter", "-o", "{tmp}/merged"], "no-adapter"),
        (["generate", "{model}", "--input", "{tmp}/nope.jsonl"], "nope.jsonl"),
    ],
)  # fmt: skip
def test_every_command_group_goes_through_the_handler(
    args, needle, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in args]
    code, err = run_main(monkeypatch, capsys, *args)
    assert_short(code, err, needle)


# ---- --debug and Ctrl-C -------------------------------------------------------------------


def alignforge(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``python -m alignforge.cli ARGS`` in a subprocess: the real entry point."""
    return subprocess.Popen(
        [sys.executable, "-m", "alignforge.cli", *args], cwd=ROOT, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    proc = alignforge("train", missing)
    _, err = proc.communicate(timeout=120)
    assert_short(proc.returncode, err, "nope.yaml does not exist")
    for args, env in [(["--debug", "train", missing], None), (["train", missing], {"ALIGNFORGE_DEBUG": "1"})]:  # fmt: skip
        proc = alignforge(*args, env=env)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "Traceback" in err and "ConfigError" in err, err


def test_ctrl_c_saves_a_checkpoint_and_says_where(sft_config, tmp_path, monkeypatch, capsys):
    """SIGINT while step 2 runs: the step finishes, checkpoint-2 is written, one line names it,
    and the exit status is 130."""
    from alignforge.training.loop import TrainLoop

    train_step = TrainLoop.train_step

    def ctrl_c_in_step_2(loop, micro):
        if loop.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(loop, micro)

    monkeypatch.setattr(TrainLoop, "train_step", ctrl_c_in_step_2)
    data = jsonl(tmp_path / "d.jsonl", [good(i) for i in range(16)])
    code, err = run_main(monkeypatch, capsys, *sft_config(f"dataset={data}", "max_steps=50"))
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert code == 130
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted at step 2 of 50; checkpoint saved in {ckpt}; "
        "run the same command to resume"
    )
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2


# ---- the core: stopping keeps exact resume -------------------------------------------------


class _Squares:
    """Summed squared error of a linear model on (x, y) rows; counts rows. ``on_call`` runs
    before the n-th forward pass (n from 1)."""

    def __init__(self, on_call=None):
        self.calls, self.on_call = 0, on_call or {}

    def count(self, batch):
        return float(len(batch["x"]))

    def tokens(self, batch):
        return len(batch["x"])

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls in self.on_call:
            self.on_call[self.calls]()
        err = model(batch["x"]).squeeze(-1) - batch["y"]
        return (err**2).sum(), {}


def _loop(tmp_path, objective=None):
    from alignforge.config.stages import TrainArgs
    from alignforge.training import TrainLoop

    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    units = [(torch.randn(3), torch.randn(())) for _ in range(16)]
    args = TrainArgs(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                     learning_rate=0.05, lr_scheduler_type="constant", progress=False,
                     report_to="jsonl")  # fmt: skip
    collate = lambda b: {"x": torch.stack([u[0] for u in b]), "y": torch.stack([u[1] for u in b])}  # noqa: E731
    return TrainLoop(nn.Linear(3, 1), objective or _Squares(), units, collate, args)


def test_a_stop_signal_checkpoints_after_the_step_and_resuming_is_exact(tmp_path):
    """SIGINT during step 3: the loop ends that step, saves checkpoint-3 and raises
    TrainingInterrupted (exit 130); the resumed run ends with the weights of one that was never
    stopped."""
    from alignforge.training.interrupt import TrainingInterrupted

    whole = _loop(tmp_path / "whole")
    whole.fit()

    before = signal.getsignal(signal.SIGINT)
    ctrl_c = {3: lambda: os.kill(os.getpid(), signal.SIGINT)}  # during step 3's forward pass
    stopped = _loop(tmp_path / "stopped", _Squares(on_call=ctrl_c))
    with pytest.raises(TrainingInterrupted) as e:
        stopped.fit()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    assert e.value.exit_code == 130
    assert str(e.value) == (
        f"interrupted at step 3 of 6; checkpoint saved in {tmp_path / 'stopped' / 'checkpoint-3'}; "
        "run the same command to resume"
    )
    resumed = _loop(tmp_path / "stopped")
    resumed.fit()
    assert resumed.step == 6
    torch.testing.assert_close(resumed.unwrapped.weight, whole.unwrapped.weight)
