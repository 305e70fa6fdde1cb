"""SPIN: per-iteration settings, the opponent's log-probs, and a 2-iteration run on the default model."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignforge.config import ConfigError, build_config
from alignforge.config.preference import SPINConfig
from alignforge.data.preference import collate_pairs, prepare_pairs, render_prompt
from alignforge.losses.preference import spin_loss
from alignforge.recipes import spin
from alignforge.recipes.dpo import pair_logps
from alignforge.rollout.transformers_engine import TransformersEngine

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

LAYOUT_PACKED_128 = SimpleNamespace(
    share_prompt=False, padding_free=True, pack_length=128, max_length=64
)


def test_per_iteration_lists_must_match_num_iterations():
    base = {"dataset": "x.json", "output_dir": "o", "num_iterations": 3}
    c = build_config(SPINConfig, {**base, "beta": [0.1, 0.1, 5.0], "learning_rate": 1e-5})
    assert c.per_iteration("beta", 2) == 5.0 and c.per_iteration("learning_rate", 2) == 1e-5
    with pytest.raises(ConfigError, match="beta: has 2 values but num_iterations is 3"):
        build_config(SPINConfig, {**base, "beta": [0.1, 0.2]})
    with pytest.raises(ConfigError, match="learning_rate: has 4 values"):
        build_config(SPINConfig, {**base, "learning_rate": [1e-5] * 4})


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    opponent = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [
        {"prompt": "Name a river.", "chosen": "The Nile is a long river.", "rejected": "Seven."},
        {"prompt": "Say hello.", "chosen": "Hello, world!", "rejected": "hello hello hello"},
    ]
    pairs, _ = prepare_pairs(rows, tok, max_length=64)
    return tok, opponent, pairs


def naive_logp(model, prompt_ids, response_ids):
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
    return lp.gather(-1, ids[0, 1:, None])[len(prompt_ids) - 1 :, 0].sum()


def test_opponent_scores_the_ground_truth_not_the_generation_twice(tiny, tiny_model_dir):
    """Unofficial bug #1: the opponent's term of the real answer must be its log-prob of the
    ground truth. The stored reference equals a separate opponent pass on each side."""
    tok, opponent, pairs = tiny
    collate = spin.make_collate(tok.pad_token_id, LAYOUT_PACKED_128)
    ref = spin.compute_ref_logps(opponent, None, pairs, collate, 8, "cpu")
    for p, (real, gen) in zip(pairs, ref.tolist(), strict=True):
        assert abs(real - float(naive_logp(opponent, p.prompt_ids, p.chosen_ids))) < 1e-4
        assert abs(gen - float(naive_logp(opponent, p.prompt_ids, p.rejected_ids))) < 1e-4
        assert abs(real - gen) > 1e-2  # passing the generation twice would be visible
    # the objective feeds exactly these into spin_loss
    for p, r in zip(pairs, ref.tolist(), strict=True):
        p.ref = tuple(r)
    batch = collate(pairs)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    for q in policy.parameters():
        q.data.add_(0.02 * torch.randn_like(q))
    loss_sum, _ = spin.SPINObjective(beta=0.5)(policy, batch)
    logps = pair_logps(policy, batch)[0]
    want = spin_loss(logps[:2], logps[2:], ref[:, 0], ref[:, 1], beta=0.5).losses.sum()
    assert abs(float(loss_sum) - float(want)) < 1e-5


def test_log_ratio_sign_policy_minus_opponent(tiny, tiny_model_dir):
    """Unofficial bug #2: h = [log p_theta(y) - log p_opp(y)] on the real answer (not its
    negative). At the opponent itself the loss is log 2; one gradient step raises the policy's
    log-prob of the real answer and lowers that of the generation."""
    tok, opponent, pairs = tiny
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = collate_pairs(pairs, tok.pad_token_id, layout="packed")
    batch["ref_logps"] = pair_logps(opponent, batch)[0].detach()
    objective = spin.SPINObjective(beta=1.0)
    loss_sum, stats = objective(policy, batch)
    assert abs(float(loss_sum) / 2 - 0.693147) < 1e-4 and abs(stats["rewards/margins"]) < 1e-4
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    before = batch["ref_logps"]
    for _ in range(3):
        opt.zero_grad()
        objective(policy, batch)[0].backward()
        opt.step()
    with torch.no_grad():
        after = pair_logps(policy, batch)[0]
    assert (after[:2] > before[:2]).all() and (after[2:] < before[2:]).all()
    assert float(objective(policy, batch)[0]) / 2 < 0.69


def test_generation_uses_the_training_template_and_counts_truncation(tiny, tiny_model_dir):
    """Generation prompts are rendered by the same function as the training prompts; prompts are
    never scored (bugs #3/#4 are covered by tests/prefopt/test_pair_logps.py)."""
    tok, opponent, _ = tiny
    prompts = [[{"role": "user", "content": "Name a river."}], [{"role": "user", "content": "Hi"}]]
    engine = TransformersEngine(opponent, tok, batch_size=2)
    gens = spin.generate_responses(engine, tok, prompts, max_new_tokens=6)
    assert all(g.n_tokens <= 6 for g in gens)
    assert all(g.truncated == (g.n_tokens == 6) for g in gens)
    items = [(prompts[0], gens[0].text), (prompts[1], "a different answer")]
    rows, stats = spin.make_pair_rows(items, gens)
    assert stats.dropped_exact == 1 and stats.exact_match_rate == 0.5 and len(rows) == 1
    pair = prepare_pairs(rows, tok, 64)[0][0]
    assert (
        pair.prompt_ids
        == tok(render_prompt(tok, prompts[1]), add_special_tokens=False)["input_ids"]
    )


def test_sampled_generation_runs_and_follows_the_seed(tiny):
    """``do_sample: true`` used to pass do_sample twice to generate() and crash. Sampled answers
    follow the seed (the same seed, the same answers; another seed, other answers) and leave the
    global RNG as it was."""
    tok, opponent, _ = tiny
    prompts = [[{"role": "user", "content": f"Name a {w}."}] for w in ("river", "city", "tree")]
    cfg = SimpleNamespace(
        generation_batch_size=2, max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.95
    )
    acc = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    engine = TransformersEngine(opponent, tok, batch_size=2)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = spin.generate_shared(engine, tok, prompts, cfg, acc, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = spin.generate_shared(engine, tok, prompts, cfg, acc, seed=7)
    c = spin.generate_shared(engine, tok, prompts, cfg, acc, seed=8)
    assert len(a) == 3 and all(1 <= g.n_tokens <= 6 for g in a)
    assert a == b and [g.text for g in a] != [g.text for g in c]
    greedy = spin.generate_responses(engine, tok, prompts, 6, do_sample=False)
    assert greedy == spin.generate_responses(engine, tok, prompts, 6, do_sample=False)
    assert [g.text for g in a] != [g.text for g in greedy]  # a random tiny model: sampling shows


def spin_cfg(model, data, out, **kw):
    base = dict(
        stage="spin",
        model_name_or_path=model,
        dataset=data,
        output_dir=str(out),
        num_iterations=2,
        beta=[0.1, 0.2],
        learning_rate=[2e-3, 1e-3],
        max_new_tokens=24,
        generation_batch_size=8,
        max_length=96,
        per_device_train_batch_size=4,
        max_steps=1,
        share_prompt=True,
        lora_rank=8,
        lora_dropout=0.0,
        progress=False,
        report_to="none",
    )
    return build_config(SPINConfig, {**base, **kw})


def sft_file(tmp_path, n=8):
    rows = json.load(open(os.path.join(ROOT, "examples/data/alpaca_en_demo.json")))
    rows = sorted(rows, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[
        :n
    ]
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(rows))
    return str(data)


def no_generation(*a, **k):
    raise AssertionError("a finished iteration was redone")


@pytest.mark.timeout(
    1200
)  # generation + training of a 135M model, twice: under a minute on 2 idle cores
def test_two_iterations_on_the_default_model_advance_the_opponent(
    default_model_dir, tmp_path, monkeypatch
):
    data, out = sft_file(tmp_path), tmp_path / "spin"
    s = spin.run(spin_cfg(default_model_dir, data, out))
    it0, it1 = s["iterations"]
    # iteration 1's opponent is iteration 0's merged model, not the starting model ...
    assert it1["opponent_fingerprint"] == it0["model_fingerprint"] != it0["opponent_fingerprint"]
    # ... and it scores the same (mixed-in) pairs differently from iteration 0's opponent
    old = torch.load(out / "iter_0" / "opponent_logps_train.pt")
    new = torch.load(out / "iter_1" / "opponent_logps_train.pt")
    shared = [new["keys"].index(k) for k in old["keys"]]
    assert it1["previous_pairs_mixed"] == len(old["keys"]) > 0
    assert (new["values"][shared] - old["values"]).abs().max() > 1e-3
    assert it0["generation"]["n"] == 8 and 0 <= it0["generation"]["truncation_rate"] <= 1
    assert it0["generation"]["max_tokens"] <= 24
    assert it0["beta"] == 0.1 and it1["learning_rate"] == 1e-3
    assert it0["final"]["rewards/margins"] > 0  # the policy moved away from its opponent
    for f in (
        "iter_0/model/config.json",
        "iter_1/done.json",
        "summary.json",
        "spin_iterations.png",
    ):
        assert (out / f).exists(), f
    # resumable per iteration: a rerun finds both iterations finished and redoes nothing
    (out / "summary.json").unlink()
    monkeypatch.setattr(spin, "generate_responses", no_generation)
    monkeypatch.setattr(spin, "TrainLoop", no_generation)
    again = spin.run(spin_cfg(default_model_dir, data, out))
    assert again["iterations_resumed"] == 2 and again["iterations"] == s["iterations"]


def test_early_stop_when_the_gain_vanishes_and_resume_after_it(
    tiny_model_dir, tmp_path, monkeypatch
):
    data, out = sft_file(tmp_path, n=6), tmp_path / "spin"
    c = spin_cfg(tiny_model_dir, data, out, num_iterations=3, beta=0.1, learning_rate=1e-3,
                 max_new_tokens=8, early_stop_margin=1e9)  # fmt: skip
    s = spin.run(c)
    assert s["iterations_done"] == 1 and s["stopped_early"]
    assert s["iterations"][0]["stop_reason"].startswith("gain vanished: rewards/margins")
    (out / "summary.json").unlink()
    monkeypatch.setattr(spin, "generate_responses", no_generation)
    assert spin.run(c)["iterations_done"] == 1  # the stop is remembered, nothing is redone


def test_the_opponent_answers_from_alignforge_serve_given_each_iteration(tiny_model_dir, tmp_path):
    """rollout_engine: server: ``alignforge serve`` (a subprocess, fp32) is given each
    iteration's opponent before it answers, so its greedy answers are the in-process opponent's
    in both iterations, though iteration 1's opponent answers otherwise than iteration 0's."""
    import httpx
    from serve_process import ServeProcess

    data = sft_file(tmp_path, n=6)
    kw = dict(num_iterations=2, beta=0.1, learning_rate=5e-2, max_new_tokens=8, max_steps=2)
    server = ServeProcess(tiny_model_dir, tmp_path / "serve.log").start()
    try:
        remote = spin.run(spin_cfg(tiny_model_dir, data, tmp_path / "server", **kw,
                                   rollout_engine="server", rollout_base_url=server.base_url,
                                   rollout_model="tiny"))  # fmt: skip
        reply = httpx.post(f"{server.base_url}/completions", timeout=60,
                           json={"model": "tiny", "prompt": [5, 6], "max_tokens": 1}).json()  # fmt: skip
    finally:
        server.stop()
    spin.run(spin_cfg(tiny_model_dir, data, tmp_path / "local", **kw))

    def answers(run, k):
        rows = json.loads((tmp_path / run / f"iter_{k}" / "pairs_train.json").read_text())["rows"]
        return [r["rejected"] for r in rows]

    assert answers("server", 0) == answers("local", 0)
    assert answers("server", 1) == answers("local", 1) != answers("local", 0)
    # the server was left serving the last opponent, under its fingerprint
    assert reply["system_fingerprint"] == remote["iterations"][1]["opponent_fingerprint"]


def test_a_server_that_cannot_load_weights_is_refused_at_start(tiny_model_dir, tmp_path):
    """vLLM's OpenAI server has no /v1/load_weights: SPIN, whose opponent changes after every
    iteration, refuses it before generating anything, saying what to do."""
    from fastapi import FastAPI

    from alignforge.errors import UserError
    from alignforge.rollout.server import start_server

    app = FastAPI()
    app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
    running = start_server(app)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = spin_cfg(tiny_model_dir, "x.json", tmp_path, rollout_engine="server",
                   rollout_base_url=running.base_url)  # fmt: skip
    try:
        with pytest.raises(UserError, match="SPIN's opponent changes after every iteration"):
            spin.opponent_server(cfg, tok, [tok.eos_token_id], tmp_path)
    finally:
        running.stop()


def test_the_rollout_keys_are_checked_as_for_ppo():
    base = {"dataset": "x.json", "output_dir": "o"}
    with pytest.raises(ConfigError, match="rollout_base_url: rollout_engine server needs"):
        build_config(SPINConfig, {**base, "rollout_engine": "server"})
    with pytest.raises(ConfigError, match="rollout_model: only read with rollout_engine: server"):
        build_config(SPINConfig, {**base, "rollout_model": "tiny"})
