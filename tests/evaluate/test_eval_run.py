"""`alignforge eval` end to end: tiny local model, model + LoRA adapter, local SSE endpoint."""

import json

import pytest
import typer
from typer.testing import CliRunner

from alignforge.evaluate.cli import eval_command
from alignforge.evaluate.generation import OpenAIGenerator, TransformersGenerator
from alignforge.evaluate.runner import SystemSpec, load_examples, parse_system, run_eval
from alignforge.evaluate.stats import verdict
from alignforge.evaluate.tasks import get_task

DATA = "examples/data/ner_finance.jsonl"


@pytest.fixture(scope="module")
def examples():
    return load_examples(get_task("extraction"), DATA, limit=6)


def perfect_for_even(examples):
    """Gold JSON for even items (keyed by the user message); odd items get the junk default."""
    return {
        e.messages[-1]["content"]: json.dumps(e.reference)
        for i, e in enumerate(examples)
        if i % 2 == 0
    }


def test_transformers_generator_measures_ttft_and_tokens(tiny_model_dir):
    gen = TransformersGenerator.from_path(str(tiny_model_dir), max_new_tokens=6, batch_size=2)
    msgs = [[{"role": "user", "content": "hello " * k}] for k in (1, 3, 5)]
    outs = gen.generate(msgs)
    assert len(outs) == 3
    for g in outs:
        assert 0 < g.ttft_s < g.seconds and 1 <= g.n_tokens <= 6 and g.tokens_per_s > 0
    # greedy: same prompt, same text, whether batched with others or alone
    assert gen.generate(msgs[:1])[0].text == outs[0].text


def test_transformers_generator_gives_the_engines_greedy_rollouts(tiny_model_dir):
    """The eval's local generator is the rollout engine's greedy decoding (batched as it likes),
    which is transformers' own greedy ``generate`` of each prompt alone."""
    import torch

    from alignforge.rollout import TransformersEngine, chat_prompt_ids

    gen = TransformersGenerator.from_path(str(tiny_model_dir), max_new_tokens=12, batch_size=2)
    msgs = [[{"role": "user", "content": q}] for q in ("hello", "Name a river.", "2+2?", "Why?")]
    outs = gen.generate(msgs)
    ids = [chat_prompt_ids(gen.tokenizer, m) for m in msgs]
    engine = TransformersEngine(gen.model, gen.tokenizer, batch_size=8)
    rollouts = [r for [r] in engine.generate(ids, greedy=True, max_new_tokens=12)]
    assert [(g.text, g.n_tokens) for g in outs] == [(r.text, r.n_tokens) for r in rollouts]
    for p, r in zip(ids, rollouts, strict=True):
        with torch.no_grad():
            hf = gen.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12)
        assert hf[0, len(p) :].tolist() == r.completion_ids


def test_openai_generator_streams_and_retries(fake_server):
    with fake_server({"hi": '{"entities": []}'}) as srv:
        gen = OpenAIGenerator(srv.url, model="m", concurrency=2, retries=2)
        outs = gen.generate(
            [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "x"}]]
        )
        assert outs[0].text == '{"entities": []}'
        assert outs[0].n_tokens == 3  # the server's usage count (3 chunks of 7 chars)
        assert 0.015 < outs[0].ttft_s <= outs[0].seconds
        assert srv.requests == 3  # the first attempt got a 503 and was retried
        # timed from the answered attempt, without the 0.5 s backoff before it
        assert all(o.seconds < 0.5 for o in outs)
        assert srv.payloads[-1]["stream"] is True and srv.payloads[-1]["temperature"] == 0.0


def test_openai_generator_counts_chunks_when_usage_is_rejected(fake_server):
    with fake_server({"hi": '{"entities": []}'}, reject_stream_options=True) as srv:
        gen = OpenAIGenerator(srv.url + "/chat/completions", model="m", retries=1)
        [out] = gen.generate([[{"role": "user", "content": "hi"}]])
        assert out.text == '{"entities": []}' and out.n_tokens == 3  # 3 content chunks
        # 503 (retried), 400 naming stream_options, then asked again without it
        assert srv.requests == 3 and "stream_options" not in srv.payloads[-1]


def test_multi_system_eval_writes_results_failures_and_table(
    tmp_path, examples, tiny_model_dir, tiny_adapter_dir, fake_server
):
    task = get_task("extraction")
    with fake_server(perfect_for_even(examples)) as srv:
        systems = [
            SystemSpec(name="api", model="served", base_url=srv.url),
            SystemSpec(name="local", model=str(tiny_model_dir)),
            parse_system(f"lora=model={tiny_model_dir},adapter={tiny_adapter_dir}"),
        ]
        results = run_eval(
            task,
            examples,
            systems,
            tmp_path,
            max_new_tokens=8,
            batch_size=4,
            n_boot=300,
            dataset=DATA,
        )
    by = {s["name"]: s for s in results["systems"]}
    api = by["api"]
    # hand check: even items perfect, odd items unparseable -> TP = gold entities of even items,
    # FN = gold entities of odd items, FP = 0
    tp = sum(len(e.reference["entities"]) for e in examples[0::2])
    fn = sum(len(e.reference["entities"]) for e in examples[1::2])
    assert api["metrics"]["f1"]["value"] == pytest.approx(2 * tp / (2 * tp + fn))
    assert (
        api["metrics"]["f1"]["low"] <= api["metrics"]["f1"]["value"] <= api["metrics"]["f1"]["high"]
    )
    assert api["parse_failures"] == 3 and api["parse_failure_rate"] == 0.5
    assert api["latency"]["ttft_s_p50"] > 0.015 and api["latency"]["tokens_per_s_mean"] > 0
    for name in ("local", "lora"):
        lat = by[name]["latency"]
        assert lat["ttft_s_p50"] > 0 and lat["throughput_tokens_per_s"] > 0
        assert by[name]["delta_vs_first"]["baseline"] == "api"
    assert by["lora"]["source"]["adapter"] == str(tiny_adapter_dir)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["n"] == 6 and [s["name"] for s in saved["systems"]] == ["api", "local", "lora"]
    table = (tmp_path / "results.md").read_text()
    assert "| api |" in table and "| local |" in table and "| lora |" in table
    failures = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    api_fail = [f for f in failures if f["system"] == "api" and f["kind"] == "parse_failure"]
    assert sorted(f["index"] for f in api_fail) == [1, 3, 5]
    assert api_fail[0]["prediction"] == "Sorry, I cannot do that." and api_fail[0]["score"] == 0


def test_cli_eval_endpoint_and_resume(tmp_path, examples, fake_server):
    app = typer.Typer()
    app.command()(eval_command)
    out = tmp_path / "ev"
    args = ["--data", DATA, "--limit", "6", "--output-dir", str(out), "--n-boot", "200"]
    with fake_server(perfect_for_even(examples)) as srv:
        res = CliRunner().invoke(
            app, [*args, "--base-url", srv.url, "--model", "served", "--name", "frontier"]
        )
        assert res.exit_code == 0, res.output
        assert "| frontier |" in res.output
        first = json.loads((out / "results.json").read_text())
        n_requests = srv.requests
        # second run: every generation comes from the cache, nothing is requested again
        res = CliRunner().invoke(
            app, [*args, "--base-url", srv.url, "--model", "served", "--name", "frontier"]
        )
        assert res.exit_code == 0, res.output
        assert srv.requests == n_requests
    again = json.loads((out / "results.json").read_text())
    assert again["systems"][0]["metrics"] == first["systems"][0]["metrics"]
    assert again["systems"][0]["latency"]["throughput_tokens_per_s"] is None  # nothing new
    # the option's former name is refused with the new one
    res = CliRunner().invoke(app, [*args, "--endpoint", "http://x/v1", "--model", "served"])
    assert res.exit_code != 0 and "--endpoint is now --base-url" in str(res.exception)


def test_systems_yaml_and_bad_specs(tmp_path):
    from alignforge.config import ConfigError
    from alignforge.evaluate.runner import load_systems

    y = tmp_path / "systems.yaml"
    y.write_text(
        "systems:\n  - {name: a, model: m1}\n  - {name: b, base_url: 'http://x/v1', model: big}\n"
    )
    assert [s.name for s in load_systems(y)] == ["a", "b"]
    y.write_text("systems:\n  - {name: a, modle: m1}\n")
    with pytest.raises(ConfigError, match="modle"):
        load_systems(y)
    with pytest.raises(ConfigError, match="not key=value"):
        parse_system("x=model=a,adapter")
    with pytest.raises(ConfigError, match="endpoint: unknown key; it is now base_url"):
        parse_system("x=endpoint=http://x/v1,model=big")
    assert parse_system("sft=runs/sft").model == "runs/sft"


def test_read_rows_formats_and_errors(tmp_path):
    from datasets import Dataset, DatasetDict

    from alignforge.evaluate.runner import read_rows

    rows = [{"instruction": "say hi", "output": "hi"}, {"instruction": "say yo", "output": "yo"}]
    DatasetDict({"test": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    assert read_rows(tmp_path / "hf") == rows
    with pytest.raises(ValueError, match="no split 'dev'; has test"):
        read_rows(tmp_path / "hf", "dev")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "test.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_rows(tmp_path / "d") == [{"a": 1}, {"a": 2}]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    task = get_task("instruction")
    with pytest.raises(ValueError, match=r"bad2.jsonl: row 1: no reference"):
        (tmp_path / "bad2.jsonl").write_text(
            '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n'
        )
        load_examples(task, tmp_path / "bad2.jsonl")


def test_endpoint_errors_are_clear(fake_server):
    from alignforge.evaluate.generation import EndpointError

    with fake_server({}) as srv:
        gen = OpenAIGenerator(srv.url + "/nope", model="m", retries=0)
        with pytest.raises(EndpointError, match=r"/nope/chat/completions: HTTP 404"):
            gen.generate([[{"role": "user", "content": "hi"}]])
        port = srv.httpd.server_address[1]
    gen = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", model="m", retries=1)
    down = r"no response after 2 attempt\(s\): .*ConnectError.*check that the server is running"
    with pytest.raises(EndpointError, match=down):
        gen.generate([[{"role": "user", "content": "hi"}]])


class _ScriptedGenerator:
    """Answers gold JSON; raises once ``fail_after`` items were produced (an interrupted run)."""

    batch_size = 2

    def __init__(self, answers, fail_after=None):
        self.answers, self.fail_after, self.calls = answers, fail_after, []

    def generate(self, batch):
        from alignforge.evaluate.generation import Generation

        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += [m[-1]["content"] for m in batch]
        return [Generation(self.answers[m[-1]["content"]], 0.01, 5, 0.02) for m in batch]


def test_interrupted_eval_resumes_from_cache(tmp_path, examples):
    task = get_task("extraction")
    answers = {e.messages[-1]["content"]: json.dumps(e.reference) for e in examples}
    spec = [SystemSpec(name="s", model="unused")]
    first = _ScriptedGenerator(answers, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_eval(task, examples, spec, tmp_path, n_boot=100, generators={"s": first})
    assert len((tmp_path / "s" / "generations.jsonl").read_text().splitlines()) == 4
    second = _ScriptedGenerator(answers)
    res = run_eval(task, examples, spec, tmp_path, n_boot=100, generators={"s": second})
    assert len(second.calls) == 2  # only the two items the interrupted run had not reached
    assert res["systems"][0]["metrics"]["f1"]["value"] == 1.0
    # every answer cached: the system is scored without loading its model (there is none here)
    again = run_eval(task, examples, spec, tmp_path, n_boot=100)
    assert again["systems"][0]["metrics"] == res["systems"][0]["metrics"]


def test_each_system_is_paired_with_the_first_and_the_one_before(tmp_path, examples):
    """Gold answers for none, half and all items: each step up is a paired difference of F1
    whose interval reads as improved or not; the third system is compared with both others."""
    task = get_task("extraction")
    gold = {e.messages[-1]["content"]: json.dumps(e.reference) for e in examples}
    empty = dict.fromkeys(gold, '{"entities": []}')
    half = {**empty, **perfect_for_even(examples)}
    gens = {"none": _ScriptedGenerator(empty), "half": _ScriptedGenerator(half),
            "all": _ScriptedGenerator(gold)}  # fmt: skip
    specs = [SystemSpec(name=n, model="unused") for n in gens]
    res = run_eval(task, examples, specs, tmp_path, n_boot=200, generators=gens)
    none, half_, all_ = res["systems"]
    assert "delta_vs_first" not in none and "delta_vs_previous" not in none
    assert half_["delta_vs_previous"] == half_["delta_vs_first"]
    assert half_["delta_vs_first"]["baseline"] == "none"
    assert all_["delta_vs_previous"]["baseline"] == "half"
    assert all_["delta_vs_first"]["baseline"] == "none"
    f1 = {s["name"]: s["metrics"]["f1"]["value"] for s in res["systems"]}
    assert all_["delta_vs_previous"]["value"] == pytest.approx(f1["all"] - f1["half"])
    assert all_["delta_vs_first"]["value"] == pytest.approx(f1["all"] - f1["none"])
    d = all_["delta_vs_first"]  # the table says how the difference reads
    reads = verdict(d["low"], d["high"])
    cell = f"{d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] {reads}"
    assert f"| {cell} |" in (tmp_path / "results.md").read_text()


def test_system_spec_refuses_an_adapter_on_a_gguf():
    from alignforge.config import ConfigError
    from alignforge.evaluate.runner import parse_system

    with pytest.raises(ConfigError, match="is a GGUF file; export the adapter merged"):
        parse_system("q4=model=m.gguf,adapter=runs/ppo/final")
