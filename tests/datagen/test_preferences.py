import json

import pytest
import torch

from alignforge.datagen.preferences import policy_fingerprint, sample_preferences, temperature_sweep
from alignforge.datagen.splits import make_pairs
from alignforge.rollout import TransformersEngine, chat_prompt_ids

PROMPTS = [
    {"prompt_id": f"p{i}", "doc_id": f"d{i // 2}", "prompt": text}
    for i, text in enumerate(["Extract entities: Apple bought Beats.", "Who founded Tesla?",
                              "Summarise: rates rose.", "Name a river.", "Translate 'chat'.", "2+2?"])
]  # fmt: skip
COMPLETION_KEYS = {
    "completion_id",
    "token_ids",
    "text",
    "greedy",
    "temperature",
    "logp",
    "token_logps",
    "n_tokens",
    "finish_reason",
}
ROW_KEYS = {"prompt_id", "doc_id", "split", "prompt", "policy", "completions", "created_at"}


def test_greedy_once_shuffled_and_logps_match_the_policy(tiny_model, tokenizer, tmp_path):
    engine = TransformersEngine(tiny_model, tokenizer, policy_version="fp-1", batch_size=8)
    rows = sample_preferences(PROMPTS, engine, tokenizer, tmp_path, k=4, temperature=0.8,
                              max_new_tokens=6, policy_model="tiny", progress=False)  # fmt: skip
    assert [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == rows
    positions, checked = [], 0
    for row, src in zip(rows, PROMPTS, strict=True):
        assert set(row) == ROW_KEYS and row["prompt"] == src["prompt"]
        assert row["policy"] == {"model": "tiny", "fingerprint": "fp-1"}
        assert row["split"] in {"train", "validation", "test"}
        comps = row["completions"]
        assert len(comps) == 4 and all(set(c) == COMPLETION_KEYS for c in comps)
        assert sum(c["greedy"] for c in comps) == 1
        assert len({c["completion_id"] for c in comps}) == 4
        positions.append(next(i for i, c in enumerate(comps) if c["greedy"]))
        prompt_ids = chat_prompt_ids(tokenizer, src["prompt"])
        for c in comps:
            assert c["n_tokens"] == len(c["token_logps"]) and c["logp"] == pytest.approx(
                sum(c["token_logps"])
            )
            ids = c["token_ids"]  # the sampled tokens (re-encoding the text need not give them)
            assert len(ids) == c["n_tokens"]
            full = torch.tensor([prompt_ids + ids])
            with torch.no_grad():
                logits = tiny_model(full).logits[0, len(prompt_ids) - 1 : -1]
            temp = 1.0 if c["greedy"] else 0.8
            expected = (
                torch.log_softmax(logits / temp, -1)
                .gather(-1, torch.tensor(ids)[:, None])
                .squeeze(-1)
            )
            assert torch.allclose(torch.tensor(c["token_logps"]), expected, atol=1e-4)
            checked += 1
            assert c["temperature"] == (0.0 if c["greedy"] else 0.8)
    assert checked >= 12, f"only {checked} of 24 completions re-tokenised exactly"
    assert len(set(positions)) > 1, "greedy must not always sit in the same position"
    # documents keep one split across their prompts, and pairs keep their prompt's split
    by_doc = {}
    for row in rows:
        by_doc.setdefault(row["doc_id"], set()).add(row["split"])
        pairs = list(make_pairs(row))
        assert len(pairs) == 6 and {p["split"] for p in pairs} == {row["split"]}
    assert all(len(s) == 1 for s in by_doc.values())


def test_resume_reuses_finished_prompts(tiny_model, tokenizer, tmp_path):
    engine = TransformersEngine(tiny_model, tokenizer, policy_version="fp-2")
    first = sample_preferences(
        PROMPTS[:3], engine, tokenizer, tmp_path, k=2, max_new_tokens=4, progress=False
    )

    class Refuse:
        policy_version = "fp-2"

        def generate(self, *a, **kw):
            raise AssertionError("cached prompts must not be generated again")

    again = sample_preferences(
        PROMPTS[:3], Refuse(), tokenizer, tmp_path, k=2, max_new_tokens=4, progress=False
    )
    assert again == first


def test_policy_fingerprint_tracks_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    (tmp_path / "notes.txt").write_text("ignored")
    a = policy_fingerprint(tmp_path)
    (tmp_path / "notes.txt").write_text("still ignored")
    assert policy_fingerprint(tmp_path) == a and a.startswith("sha256:")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 99 + b"\x01")
    assert policy_fingerprint(tmp_path) != a
    with pytest.raises(FileNotFoundError):
        policy_fingerprint(tmp_path / "missing")


def test_temperature_sweep_hand_computed():
    judgements = (
        [{"temperature": 0.7, "outcome": "sample"}] * 6 + [{"temperature": 0.7, "outcome": "greedy"}] * 4
        + [{"temperature": 1.0, "outcome": "greedy"}] * 5 + [{"temperature": 1.0, "outcome": "tie"}] * 2
        + [{"temperature": 1.0, "outcome": "sample"}] * 3
        + [{"temperature": 1.3, "outcome": "greedy"}] * 8 + [{"temperature": 1.3, "outcome": "sample"}] * 2
    )  # fmt: skip
    table = temperature_sweep(judgements)
    rates = {r.temperature: r.greedy_win_rate for r in table.rows}
    assert rates == {0.7: pytest.approx(0.4), 1.0: pytest.approx(0.6), 1.3: pytest.approx(0.8)}
    assert table.recommended == 0.7
    assert table.rows[1].ties == 2 and table.rows[1].n == 10
    assert "recommended temperature: 0.7" in table.format()
    assert temperature_sweep([{"temperature": 1.0, "outcome": "sample"}]).recommended == 1.0
    assert temperature_sweep([{"temperature": 1.0, "outcome": "greedy"}]).recommended is None
    with pytest.raises(ValueError, match="judgement 0"):
        temperature_sweep([{"temperature": 1.0, "outcome": "maybe"}])


def test_a_server_given_the_policy_samples_what_the_process_samples(
    tiny_model_dir, tmp_path, monkeypatch
):
    """``rollout_engine: server``: the server starts with other weights and is given ``model``
    before sampling, so its samples (seeded per prompt) are the in-process ones, token for
    token, recorded under the policy's fingerprint."""
    import sys

    from tiny import make_model
    from transformers import AutoTokenizer

    from alignforge import cli
    from alignforge.rollout.server import create_app, start_server

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = make_model(tmp_path / "other", tok, seed=1).eval()  # not the policy
    engine = TransformersEngine(other, tok)
    running = start_server(create_app(engine, model_name="tiny"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS[:3]))
    args = ["data", "preferences", f"prompts={prompts}", f"model={tiny_model_dir}", "k=3",
            "max_new_tokens=8", "seed=5"]  # fmt: skip
    try:
        for name, extra in (
            ("local", []),
            ("served", ["rollout_engine=server", f"rollout_base_url={running.base_url}"]),
        ):
            monkeypatch.setattr(
                sys, "argv", ["alignforge", *args, f"output_dir={tmp_path / name}", *extra]
            )
            try:
                cli.main()
            except SystemExit as e:
                assert not e.code
    finally:
        running.stop()

    def completions(name):
        rows = [json.loads(line) for line in open(tmp_path / name / "samples.jsonl")]
        return [(r["policy"]["fingerprint"], c["completion_id"], c["token_ids"], c["token_logps"])
                for r in rows for c in r["completions"]]  # fmt: skip

    local, served = completions("local"), completions("served")
    assert len(local) == 9 and {c[0] for c in local} == {policy_fingerprint(tiny_model_dir)}
    assert [c[:3] for c in served] == [c[:3] for c in local]
    for a, b in zip(served, local, strict=True):
        assert a[3] == pytest.approx(b[3], abs=1e-5)
