"""`alignforge generate` through the rollout engine: in process, and on `alignforge serve` with
--base-url (the same greedy answers), sampled answers, and --served-model alone refused."""

import json
import sys

import pytest

from alignforge import cli


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``alignforge ARGS`` through ``cli.main``: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["alignforge", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignforge.rollout import TransformersEngine
    from alignforge.rollout.server import create_app, start_server

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    engine = TransformersEngine(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    running = start_server(create_app(engine, model_name="tiny"))
    yield running
    running.stop()


def answers(path) -> list[str]:
    return [json.loads(line)["generation"] for line in open(path)]


def test_a_server_gives_the_in_process_greedy_answers(
    tiny_model_dir, server, tmp_path, monkeypatch, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": q} for q in ("Name a river.", "hello", "Why?")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["generate", tiny_model_dir, "--input", str(prompts), "--max-new-tokens", "10"]
    code, _, err = run(monkeypatch, capsys, *common, "--output", str(tmp_path / "local.jsonl"),
                       "--batch-size", "2")  # fmt: skip
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, *common, "--output", str(tmp_path / "served.jsonl"),
                       "--base-url", server.base_url, "--served-model", "tiny")  # fmt: skip
    assert code == 0, err
    local = answers(tmp_path / "local.jsonl")
    assert len(local) == 3 and all(local)
    assert answers(tmp_path / "served.jsonl") == local


def test_sampling_at_a_temperature_and_served_model_needs_base_url(
    tiny_model_dir, server, monkeypatch, capsys
):
    args = ["generate", tiny_model_dir, "-p", "Name a river.", "--max-new-tokens", "10"]
    greedy = run(monkeypatch, capsys, *args, "--base-url", server.base_url)[1]
    sampled = {run(monkeypatch, capsys, *args, "--base-url", server.base_url,
                   "--temperature", "2.0")[1] for _ in range(3)}  # fmt: skip
    assert greedy.startswith(">>> Name a river.") and greedy not in sampled
    code, _, err = run(monkeypatch, capsys, *args, "--served-model", "tiny")
    assert code != 0 and "--served-model" in err and "--base-url" in err
