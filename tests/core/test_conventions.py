"""What TRL and LLaMA-Factory users expect of a config: `template:`, several datasets mixed with
weights, other tools' key names pointed to, paths read against the config's folder, and
`alignforge train --help` listing a stage's keys."""

import json
import os
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from alignforge.config import ConfigError, load_config
from alignforge.config.preference import DPOConfig
from alignforge.config.stages import SFTConfig
from alignforge.data import DataError, prepare_sft, read_prompts
from alignforge.data.formats import ChatExample
from alignforge.data.mix import mix_rows
from alignforge.data.preference import prepare_pairs
from alignforge.data.templating import TEMPLATES, set_chat_template, trainable_spans
from alignforge.models import load_tokenizer
from alignforge.recipes import STAGES, resolve_stage, stage_config, train_help
from alignforge.recipes.common import load_prepared
from alignforge.rollout import chat_prompt_ids

ROOT = Path(__file__).resolve().parents[2]

# a template no tokenizer ships: the tokens it gives can only come from the file
JINJA = (
    "{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]\n{% endif %}"
)
SFT_ROW = {"prompt": "Name a river.", "completion": "The Loire."}
PAIR_ROW = {"prompt": "Name a river.", "chosen": "The Loire.", "rejected": "A mountain."}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A config folder holding its template and data, and a working directory elsewhere."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "chat.jinja").write_text(JINJA)
    write_jsonl(conf / "sft.jsonl", [SFT_ROW] * 4)
    write_jsonl(conf / "pairs.jsonl", [PAIR_ROW] * 4)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return conf


def write_config(folder: Path, **data) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------- template


def test_a_jinja_file_sets_the_tokens_of_sft_and_dpo_and_is_saved_with_the_model(
    project, tiny_model_dir
):
    """The prompt is ``[user]\\nName a river.[assistant]\\n`` and the answer ``The Loire.`` + EOS,
    for SFT and for each DPO response alike; the trained model's tokenizer renders the same."""
    sft_cfg = resolve_stage(
        str(
            write_config(
                project,
                stage="sft",
                model_name_or_path=tiny_model_dir,
                dataset="sft.jsonl",
                template="chat.jinja",
                output_dir="runs/sft",
                max_length=64,
                max_steps=1,
                per_device_train_batch_size=2,
                progress=False,
                report_to="none",
            )
        ),  # fmt: skip
        [],
    )[1]
    assert sft_cfg.template == str(project / "chat.jinja")
    tok = set_chat_template(load_tokenizer(tiny_model_dir), sft_cfg.template)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, answer = "[user]\nName a river.[assistant]\n", "The Loire." + tok.eos_token

    [ex], _ = prepare_sft([SFT_ROW], tok, max_length=64)
    assert ex.input_ids == ids(prompt + answer)
    assert tok.decode([t for t in ex.labels if t != -100]) == answer

    [pair], _ = prepare_pairs([PAIR_ROW], tok, max_length=64)
    assert pair.prompt_ids == ids(prompt)
    assert pair.prompt_ids + pair.chosen_ids == ids(prompt + answer)
    assert pair.prompt_ids + pair.rejected_ids == ids(prompt + "A mountain." + tok.eos_token)

    from alignforge.recipes import sft

    summary = sft.run(sft_cfg)
    saved = load_tokenizer(summary["final_model"])
    assert saved.chat_template == JINJA
    messages = [{"role": "user", "content": SFT_ROW["prompt"]}]
    assert chat_prompt_ids(saved, messages) == ids(prompt)  # what generate, eval and serve send
    saved_config = yaml.safe_load((Path("runs/sft") / "config.yaml").read_text())
    assert saved_config["template"] == str(project / "chat.jinja")


def test_the_dpo_recipe_saves_its_template(project, tiny_model_dir):
    path = write_config(
        project, stage="dpo", model_name_or_path=tiny_model_dir, dataset="pairs.jsonl",
        template="chat.jinja", output_dir="runs/dpo", max_length=64, max_steps=1,
        per_device_train_batch_size=2, progress=False, report_to="none",
    )  # fmt: skip
    module, cfg = resolve_stage(str(path), [])
    summary = module.run(cfg)
    assert load_tokenizer(summary["final_model"]).chat_template == JINJA


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.mark.parametrize(
    "name, trained",
    [
        ("chatml", ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n"]),
        ("llama3", ["Paris.<|eot_id|>", "Rome.<|eot_id|>"]),
        ("alpaca", ["Paris.<|im_end|>\n\n", "Rome.<|im_end|>\n\n"]),
        ("empty", ["Paris.<|im_end|>", "Rome.<|im_end|>"]),
    ],
)
def test_named_templates_mask_exactly_the_answers_and_their_end_markers(
    tiny_model_dir, name, trained
):
    tok = set_chat_template(AutoTokenizer.from_pretrained(tiny_model_dir), name)
    text, spans = trainable_spans(tok, ChatExample(CONVERSATION, [False, False, True, False, True]))
    assert [text[s:e] for s, e in spans] == trained


def test_named_templates_render_the_formats_they_name(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # bos <|im_start|>, eos <|im_end|>
    msgs = CONVERSATION[:3]
    render = lambda name, m, gen=False: set_chat_template(tok, name).apply_chat_template(  # noqa: E731
        m, tokenize=False, add_generation_prompt=gen
    )
    assert render("llama3", msgs[:2], gen=True) == (
        "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert render("chatml", msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert render("alpaca", msgs[1:2], gen=True) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nCapital of France?\n\n### Response:\n"
    )
    assert render("empty", msgs) == "Be brief.Capital of France?Paris.<|im_end|>"
    assert TEMPLATES["none"] == TEMPLATES["empty"]


def test_an_unknown_template_or_bad_jinja_names_the_field(tmp_path):
    base = {"stage": "sft", "dataset": "d.jsonl", "output_dir": "o"}
    with pytest.raises(ConfigError, match="template: .*'chatmll' is neither a named template"):
        load_config(SFTConfig, write_config(tmp_path, **base, template="chatmll"))
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="bad.jinja line 1: not valid Jinja"):
        load_config(SFTConfig, write_config(tmp_path, **base, template="bad.jinja"))


# ---------------------------------------------------------------- mixing


def numbered(tag: str, n: int) -> list[dict]:
    return [{"tag": tag, "i": i} for i in range(n)]


def tags(rows) -> str:
    return "".join(r["tag"] for r in rows)


def test_mix_strategies_give_llama_factory_counts():
    a, b = numbered("a", 10), numbered("b", 30)
    concat = mix_rows([a, b], ["a", "b"], "concat")
    assert tags(concat) == "a" * 10 + "b" * 30 and concat.where(12) == "b row 2"
    under = mix_rows([a, b], ["a", "b"], "interleave_under")  # in turn until a runs out
    assert tags(under) == "ab" * 10
    over = mix_rows([a, b], ["a", "b"], "interleave_over")  # in turn until b runs out; a repeats
    assert tags(over) == "ab" * 30 and [r["i"] for r in over[::2]] == [*range(10)] * 3


def test_interleave_probs_set_the_proportions_deterministically_under_seed():
    """With p = (0.7, 0.3) over two sets of 2,000 rows, ``a`` runs out first, after about
    2,000 / 0.7 = 2,857 draws; a binomial share over 2,857 draws has sd sqrt(.21 / 2857) = 0.009."""
    a, b = numbered("a", 2000), numbered("b", 2000)
    mix = mix_rows([a, b], ["a", "b"], "interleave_under", [0.7, 0.3], seed=1)
    assert tags(mix).count("a") == 2000 and 2700 < len(mix) < 3000
    assert abs(tags(mix).count("a") / len(mix) - 0.7) < 0.03
    assert tags(mix_rows([a, b], ["a", "b"], "interleave_under", [0.7, 0.3], seed=1)) == tags(mix)
    assert tags(mix_rows([a, b], ["a", "b"], "interleave_under", [0.7, 0.3], seed=2)) != tags(mix)
    over = mix_rows([a, b], ["a", "b"], "interleave_over", [0.7, 0.3], seed=1)
    assert tags(over).count("b") >= 2000 and tags(over).count("a") > 2 * tags(over).count("b")


def test_sft_and_dpo_mix_the_datasets_a_config_lists(project, tiny_model_dir):
    write_jsonl(project / "sft2.jsonl", [SFT_ROW] * 8)
    write_jsonl(project / "pairs2.jsonl", [PAIR_ROW] * 8)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(model_name_or_path=tiny_model_dir, output_dir="o", max_length=64)
    sft = load_config(SFTConfig, write_config(project, **common, dataset=["sft.jsonl", "sft2.jsonl"],
                                              mix_strategy="interleave_over"))  # fmt: skip
    train, stats, _, _ = load_prepared(sft, tok, prepare_sft)
    assert len(train) == stats.rows == 16  # 8 of each: the 4 rows of sft.jsonl twice
    dpo = load_config(DPOConfig, write_config(project, **common, stage="dpo",
                                              dataset="pairs.jsonl,pairs2.jsonl"))  # fmt: skip
    train, stats, _, _ = load_prepared(dpo, tok, prepare_pairs)
    assert len(train) == stats.rows == 12  # concat
    prompts = read_prompts(
        [str(project / "sft.jsonl"), str(project / "sft2.jsonl")],
        mix_strategy="interleave_under",
    )
    assert len(prompts) == 8


def test_a_bad_row_of_a_mixed_dataset_names_its_file_and_row(project, tiny_model_dir):
    write_jsonl(project / "bad.jsonl", [SFT_ROW, {"prompt": "x", "completion": ""}])
    cfg = load_config(SFTConfig, write_config(project, dataset="sft.jsonl,bad.jsonl", output_dir="o",
                                              mix_strategy="interleave_under"))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DataError, match=r"bad.jsonl:2: completion is empty"):
        load_prepared(cfg, tok, prepare_sft)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"interleave_probs": "0.7,0.3"}, "interleave_probs: only mix_strategy interleave_"),
        ({"mix_strategy": "interleave_under", "interleave_probs": 0.5}, "1 values for 2 datasets"),
        ({"mix_strategy": "interleave_under", "interleave_probs": "0.6,0.6"}, "sum to 1"),
        ({"mix_strategy": "interleave_under", "interleave_probs": "a,b"}, "numbers separated"),
        ({"mix_strategy": "shuffle"}, "mix_strategy"),
    ],
)
def test_bad_mix_settings_name_the_field(tmp_path, extra, message):
    path = write_config(tmp_path, dataset="a.jsonl,b.jsonl", output_dir="o", **extra)
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, path)


def test_interleave_probs_read_as_llama_factory_writes_them(tmp_path):
    path = write_config(tmp_path, dataset="a.jsonl,b.jsonl", output_dir="o",
                        mix_strategy="interleave_over", interleave_probs="0.7,0.3")  # fmt: skip
    assert load_config(SFTConfig, path).interleave_probs == [0.7, 0.3]


# ---------------------------------------------------------------- other tools' names


@pytest.mark.parametrize(
    "config, key, hint",
    [
        (SFTConfig, "cutoff_len", "did you mean max_length? cutoff_len is another tool's name"),
        (SFTConfig, "lora_r", "did you mean lora_rank?"),
        (SFTConfig, "lr", "did you mean learning_rate?"),
        (SFTConfig, "epochs", "did you mean num_train_epochs?"),
        (SFTConfig, "batch_size", "did you mean per_device_train_batch_size?"),
        (DPOConfig, "pref_beta", "did you mean beta?"),
        (DPOConfig, "pref_loss", "did you mean loss_type?"),
        (SFTConfig, "pref_beta", "another tool's name for beta, which this config does not take"),
        (SFTConfig, "dataset_dir", "relative one is read against this config file's folder"),
    ],
)
def test_other_tools_key_names_point_to_ours(tmp_path, config, key, hint):
    path = write_config(tmp_path, dataset="d.jsonl", output_dir="o", **{key: 1})
    with pytest.raises(ConfigError) as e:
        load_config(config, path)
    assert f"{key}: unknown key" in str(e.value) and hint in str(e.value)
    with pytest.raises(ConfigError, match=hint.split("?")[0]):  # on the command line too
        load_config(config, write_config(tmp_path, dataset="d.jsonl", output_dir="o"), [f"{key}=1"])


# ---------------------------------------------------------------- paths


def test_input_paths_read_against_the_config_folder_overrides_and_output_dir_against_cwd(
    project,
):
    write_jsonl(Path("here.jsonl"), [SFT_ROW])  # in the working directory only
    path = write_config(project, dataset="sft.jsonl", eval_dataset="here.jsonl",
                        output_dir="runs/x", template="chat.jinja")  # fmt: skip
    cfg = load_config(SFTConfig, path)
    assert cfg.dataset == str(project / "sft.jsonl")
    assert cfg.eval_dataset == "here.jsonl" and cfg.output_dir == "runs/x"
    assert cfg.template == str(project / "chat.jinja")
    assert cfg.model_name_or_path == "default"
    assert load_config(SFTConfig, path, ["dataset=sft.jsonl"]).dataset == "sft.jsonl"
    listed = load_config(SFTConfig, write_config(project, dataset=["sft.jsonl", "here.jsonl"],
                                                 output_dir="o"))  # fmt: skip
    assert listed.datasets == [str(project / "sft.jsonl"), "here.jsonl"]


@pytest.mark.parametrize("name", ["sft_default", "rm", "dpo", "spin", "ppo"])
def test_shipped_examples_find_their_data_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    _, cfg = resolve_stage(str(ROOT / "examples" / f"{name}.yaml"), [])
    assert all(os.path.isfile(d) for d in cfg.datasets)


# ---------------------------------------------------------------- help


def test_train_help_lists_stages_and_a_stage_keys_with_type_default_and_meaning():
    overview = train_help(None, [])
    assert all(f"  {stage} " in overview for stage in STAGES)
    keys = train_help("stage=dpo", [])
    assert "  beta: float = 0.1\n      Strength of the KL constraint" in keys
    assert "  template: str = default\n" in keys and "  dataset: str | list[str] = required" in keys
    assert train_help(str(ROOT / "examples/dpo.yaml"), []) == keys
    assert train_help("dpo", []) == keys
    with pytest.raises(ConfigError, match="stage: got 'dpp'"):
        train_help("stage=dpp", [])


def test_train_help_on_the_command_line():
    from typer.testing import CliRunner

    from alignforge.cli import app

    result = CliRunner().invoke(app, ["train", "--help", "stage=sft"])
    assert result.exit_code == 0 and "  packing: bool = false" in result.output
    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "Stages" in result.output and "Usage" in result.output
    assert CliRunner().invoke(app, ["train"]).exit_code == 2


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_key_of_every_stage_is_described_and_help_reads_the_recipe_config(stage):
    import importlib

    cls = stage_config(stage)
    assert cls is importlib.import_module(STAGES[stage]).CONFIG
    assert [n for n, f in cls.model_fields.items() if not f.description and n != "stage"] == []
