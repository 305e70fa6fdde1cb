"""Run directories: nothing is ever deleted, a failed start is reusable, and a run resumes only
under the config it began with (alignforge/training/rundir.py)."""

import json
import os

import pytest
import yaml

from alignforge.config import ConfigError, build_config, save_config
from alignforge.config.stages import SFTConfig
from alignforge.data import DataError
from alignforge.recipes import sft
from alignforge.training.rundir import config_changes, prepare_output_dir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = json.load(open(os.path.join(ROOT, "examples/data/alpaca_en_demo.json")))[:24]
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def cfg(model, data, out, **kw):
    base = dict(stage="sft", model_name_or_path=model, dataset=data, output_dir=str(out),
                max_length=64, per_device_train_batch_size=4, max_steps=2, progress=False,
                lora_dropout=0.0, report_to="none")  # fmt: skip
    return build_config(SFTConfig, {**base, **kw})


def tree(root):
    return sorted(
        (str(p.relative_to(root)), p.read_text() if p.is_file() else None) for p in root.rglob("*")
    )


def test_overwrite_moves_the_run_aside_and_never_touches_foreign_files(data_file, tmp_path, capsys):
    # a folder with the user's own files: refused, with or without overwrite, nothing touched
    mixed = tmp_path / "mixed"
    (mixed / "other_run").mkdir(parents=True)
    (mixed / "precious.txt").write_text("keep me")
    (mixed / "other_run" / "model.bin").write_text("weights")
    (mixed / "config.yaml").write_text("stage: sft\n")
    before = tree(mixed)
    for overwrite in (True, False):
        c = cfg("m", data_file, mixed, overwrite_output_dir=overwrite)
        with pytest.raises(ConfigError, match=r"did not write \(other_run, precious.txt\)"):
            prepare_output_dir(c)
    assert tree(mixed) == before
    # a misspelt dataset fails before the folder is looked at
    with pytest.raises(ConfigError, match="dataset: .*no such file"):
        prepare_output_dir(cfg("m", data_file + "x", tmp_path / "fresh", overwrite_output_dir=True))
    assert not (tmp_path / "fresh").exists()
    # a finished run is moved to <output_dir>.previous-N, whole
    run = tmp_path / "run"
    for n in (1, 2):
        (run / "final").mkdir(parents=True)
        (run / "final" / "adapter_model.safetensors").write_text(f"run {n}")
        (run / "summary.json").write_text("{}")
        (run / "config.yaml").write_text("stage: sft\n")
        with pytest.raises(ConfigError, match="already holds a finished run"):
            prepare_output_dir(cfg("m", data_file, run))
        prepare_output_dir(cfg("m", data_file, run, overwrite_output_dir=True))
        moved = tmp_path / f"run.previous-{n}"
        assert (moved / "final" / "adapter_model.safetensors").read_text() == f"run {n}"
        assert f"moved the previous contents of {run} to {moved}" in capsys.readouterr().out
        assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_a_failed_start_is_reusable_without_a_flag(tiny_model_dir, data_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(data_file).read() + '{"instruction": "no answer"}\n')
    out = tmp_path / "run"
    with pytest.raises(DataError, match="bad.jsonl:25: cannot tell the format"):
        sft.run(cfg(tiny_model_dir, str(bad), out))
    assert [p.name for p in out.iterdir()] == ["config.yaml"]
    bad.write_text(open(data_file).read())  # the user fixes the data and runs the same command
    s = sft.run(cfg(tiny_model_dir, str(bad), out))
    assert s["steps"] == 2 and (out / "summary.json").exists()


class Interrupt(Exception):
    pass


def crash_at(step):
    def cb(loop, row):
        if loop.step == step:
            raise Interrupt

    return cb


def test_resume_refuses_a_changed_config_and_records_a_harmless_change(
    tiny_model_dir, data_file, tmp_path, capsys
):
    out = tmp_path / "run"
    kw = dict(max_steps=6, save_steps=2, learning_rate=2e-4)
    with pytest.raises(Interrupt):
        sft.run(cfg(tiny_model_dir, data_file, out, **kw), callbacks=[crash_at(5)])
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        changed = {**kw, "learning_rate": 1e-3, "lr_scheduler_type": "constant"}
        sft.run(cfg(tiny_model_dir, data_file, out, **changed))
    msg = str(e.value)
    assert (
        "learning_rate: 0.0002 -> 0.001" in msg
        and "lr_scheduler_type: 'cosine' -> 'constant'" in msg
    )
    assert "overwrite_output_dir" in msg and "another output_dir" in msg
    assert (out / "config.yaml").read_text() == saved  # the saved config still describes the run
    capsys.readouterr()
    s = sft.run(cfg(tiny_model_dir, data_file, out, **kw, logging_steps=3))
    assert "resuming from checkpoint-4" in capsys.readouterr().out
    assert s["resumed_from"].endswith("checkpoint-4") and s["steps"] == 6
    assert yaml.safe_load((out / "config.yaml").read_text())["logging_steps"] == 3


def test_which_changes_a_resume_accepts():
    defaults = {"warmup_ratio": 0.0}
    base = {"learning_rate": 2e-4, "lr_scheduler_type": "cosine", "max_steps": 10, "seed": 1,
            "logging_steps": 1, "report_to": "jsonl", "num_train_epochs": 1.0}  # fmt: skip
    assert config_changes(base, {**base, "logging_steps": 5, "report_to": "none"}, defaults) == []
    assert config_changes(base, {**base, "seed": 2}, defaults) == ["seed: 1 -> 2"]
    # a longer run takes the same first steps only when the schedule does not depend on length
    assert config_changes(base, {**base, "max_steps": 20}, defaults) == ["max_steps: 10 -> 20"]
    const = {**base, "lr_scheduler_type": "constant"}
    assert config_changes(const, {**const, "max_steps": 20}, defaults) == []
    assert config_changes(const, {**const, "max_steps": 5}, defaults) == ["max_steps: 10 -> 5"]
    warm = {**const, "warmup_ratio": 0.1}
    assert config_changes(warm, {**warm, "max_steps": 20}, defaults) == ["max_steps: 10 -> 20"]
    # a key an older config.yaml lacks counts as its default
    assert config_changes(base, {**base, "warmup_ratio": 0.0}, defaults) == []
    assert config_changes(base, {**base, "warmup_ratio": 0.1}, defaults) == [
        "warmup_ratio: 0.0 -> 0.1"
    ]


def test_spin_uses_the_same_run_directory_rules(tiny_model_dir, tmp_path):
    from alignforge.config.preference import SPINConfig
    from alignforge.recipes import spin

    rows = json.load(open(os.path.join(ROOT, "examples/data/alpaca_en_demo.json")))
    rows = sorted(rows, key=lambda r: len(r["instruction"] + r["input"] + r["output"]))[:4]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "spin"

    def spin_cfg(**kw):
        base = dict(stage="spin", model_name_or_path=tiny_model_dir, dataset=str(data),
                    output_dir=str(out), num_iterations=2, beta=0.1, learning_rate=1e-3,
                    max_new_tokens=8, generation_batch_size=4, max_length=64,
                    per_device_train_batch_size=4, max_steps=1, lora_rank=4, lora_dropout=0.0,
                    progress=False, report_to="none", early_stop_margin=1e9)  # fmt: skip
        return build_config(SPINConfig, {**base, **kw})

    (out / "iter_0").mkdir(parents=True)  # a run interrupted in its first iteration
    (out / "iter_0" / "pairs_train.json").write_text("{}")
    save_config(spin_cfg(), out / "config.yaml")
    with pytest.raises(ConfigError, match=r"beta: 0.1 -> 0.5"):
        spin.run(spin_cfg(beta=0.5))
    s = spin.run(spin_cfg(beta=0.5, overwrite_output_dir=True))
    assert s["iterations_done"] == 1 and (out / "iter_0" / "done.json").exists()
    assert (tmp_path / "spin.previous-1" / "iter_0" / "pairs_train.json").read_text() == "{}"


def test_eval_dataset_folder_gives_only_its_held_out_split(tiny_model_dir, data_file, tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = open(data_file).read().splitlines(keepends=True)
    (d / "train.jsonl").write_text("".join(rows[:20]))
    (d / "test.jsonl").write_text("".join(rows[20:]))
    s = sft.run(cfg(tiny_model_dir, str(d), tmp_path / "run", eval_dataset=str(d)))
    assert s["data"]["rows"] == 20 and s["eval_data"]["rows"] == 4
    (d / "validation.jsonl").write_text(rows[0])
    with pytest.raises(ConfigError, match=r"eval_dataset: .*more than one held-out split"):
        sft.run(cfg(tiny_model_dir, str(d), tmp_path / "run2", eval_dataset=str(d)))
    assert not (tmp_path / "run2").exists()
