"""Trackers (``report_to``): the run's config and name reach them, and a resumed run continues
the same tracker run. Everything is read back from what each tracker wrote to disk."""

import json
import time
from pathlib import Path

import pytest

from alignforge.training.tracking import MetricsLogger, flatten

ROOT = Path(__file__).resolve().parents[2]


class Stop(Exception):
    pass


def _stop_after_step_3(loop, row):
    """An interruption after step 3, past the checkpoint of step 2: the process ends, which
    closes its tracker runs as exiting would."""
    if loop.step == 3:
        loop.logger.close()
        raise Stop


def _interrupted_then_resumed_sft(tiny_model_dir, tmp_path, report_to) -> Path:
    """4 SFT steps on the tiny model, interrupted after step 3, resumed from checkpoint-2."""
    from alignforge.config import build_config
    from alignforge.config.stages import SFTConfig
    from alignforge.recipes import sft

    rows = json.load(open(ROOT / "examples/data/alpaca_en_demo.json"))[:8]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft-lr1e-3"
    cfg = build_config(
        SFTConfig,
        dict(model_name_or_path=str(tiny_model_dir), dataset=str(data), output_dir=str(out),
             max_length=64, max_steps=4, save_steps=2, per_device_train_batch_size=2,
             learning_rate=1e-3, progress=False, report_to=["jsonl", report_to]),
    )  # fmt: skip
    with pytest.raises(Stop):
        sft.run(cfg, callbacks=[_stop_after_step_3])
    first = json.loads((out / "trackers.json").read_text())[report_to]
    if report_to == "wandb":  # offline run folders are named by the second they start in
        time.sleep(1.0)
    sft.run(cfg)
    assert json.loads((out / "trackers.json").read_text())[report_to] == first
    return out


def test_flatten_joins_nested_keys_and_writes_lists_as_json():
    cfg = {"a": {"b": 1, "c": {"d": "x"}}, "lora_target": ["q", "v"], "x": None, "e": {}}
    assert flatten(cfg) == {"a.b": 1, "a.c.d": "x", "lora_target": '["q", "v"]', "x": None,
                            "e": "{}"}  # fmt: skip


def test_tensorboard_gets_config_hparams_and_a_resume_hides_the_lost_steps(
    tiny_model_dir, tmp_path
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = _interrupted_then_resumed_sft(tiny_model_dir, tmp_path, "tensorboard")
    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    # step 3 was logged twice (before the interruption and after the resume): one value is left,
    # the resumed run's, the one metrics.jsonl holds
    steps = [e.step for e in ea.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4]
    jsonl = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl if r["split"] == "train"] == [1, 2, 3, 4]
    last3 = next(r["loss"] for r in jsonl if r["step"] == 3)
    assert ea.Scalars("train/loss")[2].value == pytest.approx(last3)
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    learning_rate: 0.001" in text and "    stage: sft" in text
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["learning_rate"].number_value == pytest.approx(1e-3)
    assert hp["stage"].string_value == "sft" and hp["max_steps"].number_value == 4
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert "train/loss" in {m.name.tag for m in exp.experiment.metric_infos}


def _wandb_records(path: Path) -> list:
    """The records of an offline run's ``run-<id>.wandb`` file: a 7-byte header, then a LevelDB
    log (32 KiB blocks; each record chunk has a 7-byte header: crc, length, type) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            out.append(pb.Record.FromString(chunk))
            chunk = b""
    return out


def test_wandb_offline_run_has_name_and_config_and_resumes_the_same_id(
    tiny_model_dir, tmp_path, monkeypatch
):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = _interrupted_then_resumed_sft(tiny_model_dir, tmp_path, "wandb")
    wandb.teardown()  # the service writes the run files in the background: let it finish them
    run_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))  # one folder per start
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    for f in files:
        run = next(r.run for r in _wandb_records(f) if r.WhichOneof("record_type") == "run")
        assert run.run_id == run_id and run.display_name == "sft-lr1e-3"
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["learning_rate"] == 1e-3 and config["output_dir"] == str(out)


def test_mlflow_run_has_name_and_params_and_resumes_the_same_run(
    tiny_model_dir, tmp_path, monkeypatch
):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 warns off the file store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    out = _interrupted_then_resumed_sft(tiny_model_dir, tmp_path, "mlflow")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "sft-lr1e-3" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["learning_rate"] == "0.001" and params["stage"] == "sft"
    assert params["output_dir"] == str(out) and params["lora_target"] == "all"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "train/loss")]
    assert max(steps) == 4 and {1, 2, 3, 4} <= set(steps)  # one run across the resume
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1

    # a given run_name is used; values longer than mlflow allows are cut, not refused
    logger = MetricsLogger(tmp_path / "other", "mlflow", run_name="named",
                           config={"long": "x" * (MAX_PARAM_VAL_LENGTH + 10)})  # fmt: skip
    logger.log({"step": 1, "split": "train", "loss": 1.0})
    logger.close()
    other = json.loads((tmp_path / "other" / "trackers.json").read_text())["mlflow"]["run_id"]
    named = mlflow.get_run(other)
    assert named.info.run_name == "named"
    assert len(named.data.params["long"]) == MAX_PARAM_VAL_LENGTH
