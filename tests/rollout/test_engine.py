import pytest
import torch

from alignforge.rollout import Rollout, RolloutEngine, TransformersEngine, chat_prompt_ids


def teacher_forced(model, rollout: Rollout, temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(rollout.prompt_ids) - 1 : -1].float()
    target = torch.tensor(rollout.completion_ids)[:, None]
    return torch.log_softmax(logits / temperature, -1).gather(-1, target).squeeze(-1)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [
        chat_prompt_ids(tokenizer, "Hi"),
        chat_prompt_ids(
            tokenizer, "Extract the entities from: Apple bought Beats for $3bn in 2014."
        ),
    ]


def test_chat_prompt_ids_uses_the_chat_template(tokenizer):
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hello"}])
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Hello" in text
    assert chat_prompt_ids(tokenizer, "Hello") == ids


def test_sampled_logps_equal_teacher_forced_logps(tiny_model, tokenizer, prompts):
    engine = TransformersEngine(tiny_model, tokenizer, policy_version="v1", batch_size=3)
    assert isinstance(engine, RolloutEngine)
    groups = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=12, seed=0)
    assert [len(g) for g in groups] == [2, 2]
    for prompt, group in zip(prompts, groups, strict=True):
        for r in group:
            assert r.prompt_ids == prompt and r.policy_version == "v1" and not r.greedy
            assert len(r.logps) == len(r.completion_ids) > 0
            expected = teacher_forced(tiny_model, r)
            assert torch.allclose(torch.tensor(r.logps), expected, atol=1e-4)
            assert r.logp == pytest.approx(float(expected.sum()), abs=1e-3)


def test_temperature_logps_are_those_of_the_tempered_distribution(tiny_model, tokenizer, prompts):
    engine = TransformersEngine(tiny_model, tokenizer)
    [group] = engine.generate(prompts[1:], n=3, temperature=0.6, max_new_tokens=10, seed=1)
    for r in group:
        assert r.temperature == 0.6
        assert torch.allclose(torch.tensor(r.logps), teacher_forced(tiny_model, r, 0.6), atol=1e-4)
        # and not those of the untempered model
        assert not torch.allclose(torch.tensor(r.logps), teacher_forced(tiny_model, r), atol=1e-3)


def test_top_p_renormalises_the_kept_tokens(tiny_model, tokenizer, prompts):
    engine = TransformersEngine(tiny_model, tokenizer)
    [[r]] = engine.generate(prompts[:1], temperature=1.0, top_p=0.5, max_new_tokens=8, seed=2)
    # the nucleus holds at most the top-p mass, so every behaviour logp is >= the model's own
    assert all(
        b >= m - 1e-5 for b, m in zip(r.logps, teacher_forced(tiny_model, r).tolist(), strict=True)
    )


def test_greedy_is_argmax_and_deterministic(tiny_model, tokenizer, prompts):
    engine = TransformersEngine(tiny_model, tokenizer)
    a = engine.generate(prompts, greedy=True, max_new_tokens=8)
    b = engine.generate(prompts, greedy=True, max_new_tokens=8, seed=123)
    assert [g[0].completion_ids for g in a] == [g[0].completion_ids for g in b]
    for [r] in a:
        assert r.greedy and r.temperature == 0.0
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = tiny_model(ids).logits[0, len(r.prompt_ids) - 1 : -1]
        assert logits.argmax(-1).tolist() == r.completion_ids
        assert torch.allclose(torch.tensor(r.logps), teacher_forced(tiny_model, r), atol=1e-4)
        assert r.finish_reason == "length" and len(r.completion_ids) == 8


def test_seed_makes_sampling_reproducible(tiny_model, tokenizer, prompts):
    engine = TransformersEngine(tiny_model, tokenizer)
    a = engine.generate(prompts, n=2, max_new_tokens=6, seed=7)
    b = engine.generate(prompts, n=2, max_new_tokens=6, seed=7)
    assert [[r.completion_ids for r in g] for g in a] == [[r.completion_ids for r in g] for g in b]


def test_samples_of_one_prompt_share_its_prefill_and_match_rows_drawn_alone(
    tiny_model, tokenizer, prompts, monkeypatch
):
    """n samples of a prompt in one batch run the prompt once (a cache expanded to the n rows),
    and each row is what it would be alone: same tokens, same behaviour log-probs."""
    shared = TransformersEngine(tiny_model, tokenizer, batch_size=8)
    alone = TransformersEngine(tiny_model, tokenizer, batch_size=1)
    prefills = []
    real = TransformersEngine._shared_prefill

    def spy(self, input_ids, attention):
        cache = real(self, input_ids, attention)
        prefills.append(None if cache is None else cache.get_seq_length())
        return cache

    monkeypatch.setattr(TransformersEngine, "_shared_prefill", spy)
    a = shared.generate(prompts, n=3, max_new_tokens=10, seed=5)
    width = max(len(p) for p in prompts)
    assert prefills == [width - 1]  # one batch of 6 rows, its 2 distinct prompts prefilled
    b = alone.generate(prompts, n=3, max_new_tokens=10, seed=5)
    assert prefills[1:] == [None] * 6  # a row alone has nothing to share
    for ga, gb in zip(a, b, strict=True):
        for ra, rb in zip(ga, gb, strict=True):
            assert ra.completion_ids == rb.completion_ids
            assert torch.allclose(torch.tensor(ra.logps), torch.tensor(rb.logps), atol=1e-4)
            assert torch.allclose(torch.tensor(ra.logps), teacher_forced(tiny_model, ra), atol=1e-4)
