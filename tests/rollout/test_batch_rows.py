"""Rows with different settings generated as one batch (what ``alignforge serve`` batches)."""

from alignforge.rollout import TransformersEngine, chat_prompt_ids
from alignforge.rollout.transformers_engine import RowSpec


def test_each_row_of_a_batch_keeps_its_own_settings(tiny_model, tokenizer):
    """Greedy, tempered, nucleus and stop-string rows of different prompts and lengths, in one
    batch, give exactly what each gives alone (same tokens; log-probs within 1e-5)."""
    engine = TransformersEngine(tiny_model, tokenizer)
    hi, cities = chat_prompt_ids(tokenizer, "Hi"), chat_prompt_ids(tokenizer, "Name two cities.")
    [[greedy]] = engine.generate([hi], greedy=True, max_new_tokens=8)
    stop = greedy.text[3:5]
    specs = [
        RowSpec(hi, max_new_tokens=8, temperature=0),
        RowSpec(cities, max_new_tokens=3, temperature=0.7, seed=1),
        RowSpec(hi, max_new_tokens=6, temperature=1.0, top_p=0.8, seed=2, top_logprobs=2),
        RowSpec(hi, max_new_tokens=8, temperature=0, stop=(stop,)),
    ]
    events = []
    specs[1].on_token = events.append
    together = engine.generate_rows(specs)
    for spec, row in zip(specs, together, strict=True):
        [alone] = engine.generate_rows([RowSpec(**{**spec.__dict__, "on_token": None})])
        assert row.completion_ids == alone.completion_ids and row.text == alone.text
        assert all(abs(a - b) < 1e-5 for a, b in zip(row.logps, alone.logps, strict=True))
        assert len(row.completion_ids) <= spec.max_new_tokens
    assert together[0].completion_ids == greedy.completion_ids and together[0].greedy
    assert [len(r.completion_ids) for r in together[1:3]] == [3, 6]  # their own max_new_tokens
    assert (together[2].temperature, together[2].top_p) == (1.0, 0.8)
    assert all(
        len(top) == 2 and top[0][1] >= top[1][1] for top in together[2].extra["top_logprobs"]
    )
    # the stop string: text ends before it, the tokens keep the one that completed it
    stopped = together[3]
    assert stopped.finish_reason == "stop" and stopped.extra["stop_reason"] == stop
    assert stopped.text == greedy.text[: greedy.text.find(stop)]
    assert stopped.completion_ids == greedy.completion_ids[: len(stopped.completion_ids)]
    assert stop in tokenizer.decode(stopped.completion_ids)
    # the streamed events: one per token, the last one finishing the row
    assert [e.token_id for e in events] == together[1].completion_ids
    assert (
        events[-1].finish_reason == together[1].finish_reason
        and events[-1].text == together[1].text
    )
