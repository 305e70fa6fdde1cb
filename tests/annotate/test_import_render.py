"""Importing sampling rows and pair rows; parsing and highlighting completions."""

import json

import pytest

from alignforge.annotate.importer import RowError, read_items
from alignforge.annotate.render import highlight, mention_classes, parse_completion, split_prompt
from tests.annotate.helpers import sample_rows, write_jsonl


def test_sampling_rows_become_all_pairs_in_the_prompts_split(tmp_path):
    rows = sample_rows(n_prompts=5, k=4)
    items, rep = read_items(write_jsonl(tmp_path / "s.jsonl", rows))
    assert rep.n_rows == 5 and rep.n_items == 5 * 6 and rep.skipped == 0  # C(4, 2) = 6
    by_prompt = {}
    for it in items:
        by_prompt.setdefault(it["prompt_id"], []).append(it)
    for row in rows:
        pairs = by_prompt[row["prompt_id"]]
        assert {it["split"] for it in pairs} == {row["split"]}
        assert {(it["a_id"], it["b_id"]) for it in pairs} == {
            (f"c{i}", f"c{j}") for i in range(4) for j in range(i + 1, 4)
        }
        assert pairs[0]["meta"]["policy"] == {"model": "tiny-sft", "fingerprint": "abc123"}
        assert pairs[0]["meta"]["a"]["greedy"] is True
        assert pairs[0]["prompt"] == row["prompt"]


def test_pairs_of_identical_answers_are_left_out_and_counted(tmp_path):
    """Greedy and a cool sample often write the same text: nothing to judge, and a label on it
    (a side bias) would be a pair every preference loader refuses."""
    row = sample_rows(n_prompts=1, k=4)[0]
    row["completions"][2]["text"] = row["completions"][0]["text"]
    row["completions"][3]["text"] = row["completions"][0]["text"]
    items, rep = read_items(write_jsonl(tmp_path / "s.jsonl", [row]))
    # c0 = c2 = c3: of the 6 pairs, (c0,c2), (c0,c3), (c2,c3) hold one text twice
    assert rep.identical == 3 and rep.n_items == 3
    assert {(it["a_id"], it["b_id"]) for it in items} == {("c0", "c1"), ("c1", "c2"), ("c1", "c3")}
    assert all(it["a_text"] != it["b_text"] for it in items)


def test_pair_rows_are_accepted(tmp_path):
    rows = [
        {"pair_id": "x1", "prompt": "Extract: Acme", "a": "A1", "b": "B1", "split": "test"},
        {"prompt": "Extract", "a": "A2", "b": "B2", "source_document": "Acme Corp"},
    ]
    items, _ = read_items(write_jsonl(tmp_path / "p.jsonl", rows))
    assert items[0]["pair_key"] == "x1" and items[0]["split"] == "test"
    assert items[1]["split"] is None and items[1]["source_document"] == "Acme Corp"
    assert items[1]["pair_key"].startswith("pair-")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.pop("prompt_id"), "'prompt_id' is missing"),
        (lambda r: r.update(split="dev"), "'split' must be one of"),
        (lambda r: r.update(completions=[r["completions"][0]]), "at least 2"),
        (lambda r: r["completions"][1].pop("text"), "'completions[1].text'"),
        (lambda r: r["completions"][1].update(completion_id="c0"), "repeats 'c0'"),
        (lambda r: r.update(prompt=[{"role": "robot", "content": "x"}]), "'prompt[0].role'"),
        (lambda r: r.update(prompt=5), "'prompt' must be a string"),
        (lambda r: r["completions"][0].update(text="x" * 3000), "limit is 2000"),
    ],
)
def test_malformed_rows_name_line_and_field(tmp_path, mutate, needle):
    rows = sample_rows(n_prompts=3, k=2)
    mutate(rows[1])
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(RowError) as e:
        read_items(path, max_text_chars=2000 if "limit" in needle else 100_000)
    assert "bad.jsonl:2: " in str(e.value) and needle in str(e.value)
    items, rep = read_items(
        path, max_text_chars=2000 if "limit" in needle else 100_000, skip_bad=True
    )
    assert rep.skipped >= 1 and "bad.jsonl:2" in rep.errors[0]


def test_not_json_and_split_leak_are_errors(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(sample_rows(1)[0]) + "\n{oops\n")
    with pytest.raises(RowError, match=r"x.jsonl:2: not valid JSON"):
        read_items(p)
    rows = sample_rows(2)
    rows[1]["prompt_id"] = rows[0]["prompt_id"]
    rows[1]["split"] = "test"
    with pytest.raises(RowError, match="split prompts before pairing"):
        read_items(write_jsonl(tmp_path / "leak.jsonl", rows))


def test_parse_completion_is_lenient_about_keys_and_wrapping():
    text = """Sure! Here it is:
```json
{"Entities": [{"entity": "Acme Corp", "entity_type": "ORG", "desc": "a company"}, "Jane Doe - PERSON"],
 "relationships": [{"head": "Jane Doe", "relation": "works_for", "tail": "Acme Corp"},
                   ["Acme Corp", "located_in", "Paris"]],
 "summaries": ["Acme hired Jane."], "confidence": 0.9}
```"""
    p = parse_completion(text)
    assert p.kind == "extraction"
    assert p.entities[0] == ("Acme Corp", "ORG", "a company")
    assert p.entities[1][:2] == ("Jane Doe", "PERSON")
    assert p.relations[0][:3] == ("Jane Doe", "works_for", "Acme Corp")
    assert p.relations[1][:3] == ("Acme Corp", "located_in", "Paris")
    assert p.summary == ["Acme hired Jane."]
    assert '"confidence": 0.9' in p.other
    assert parse_completion("no json here {broken").kind == "text"
    assert parse_completion('{"foo": 1}').kind == "json"
    assert parse_completion('[{"name": "X", "type": "T"}]').entities[0].name == "X"


def test_highlight_marks_mentions_by_side_on_word_boundaries():
    a = parse_completion(
        '{"entities": [{"name": "Acme", "type": "ORG"}, {"name": "Al", "type": "PER"}]}'
    )
    b = parse_completion(
        '{"entities": [{"name": "acme", "type": "ORG"}, {"name": "Paris", "type": "LOC"}]}'
    )
    cls = mention_classes(a, b)
    assert cls == {"acme": "both", "al": "a", "paris": "b"}
    segs = highlight("ACME met Al in Paris, not Alpha.", cls)
    marked = [(s.text, s.cls) for s in segs if s.cls]
    assert marked == [("ACME", "both"), ("Al", "a"), ("Paris", "b")]
    assert "".join(s.text for s in segs) == "ACME met Al in Paris, not Alpha."


def test_split_prompt():
    msgs = [{"role": "system", "content": "Extract."}, {"role": "user", "content": "Doc text"}]
    assert split_prompt(msgs) == ("[system] Extract.", "Doc text")
    assert split_prompt("just a doc") == ("", "just a doc")
    assert split_prompt("Extract:", "the doc") == ("Extract:", "the doc")


CLEAN = json.dumps(
    {"entities": [{"name": "Acme Corp", "type": "ORG"}, {"name": "Jane Doe", "type": "PER"},
                  {"name": "Paris", "type": "LOC"}], "summary": "Acme hired Jane."}
)  # fmt: skip


def _codes(p):
    return [f.code for f in p.flags]


def test_clean_json_has_no_flags_and_every_format_problem_is_flagged():
    assert _codes(parse_completion(CLEAN)) == []
    chatty = parse_completion(f"Sure! Here it is:\n```json\n{CLEAN}\n```\nAnything else?")
    assert _codes(chatty) == ["text_around"] and "Sure! Here it is:" in chatty.flags[0].message
    assert len(chatty.entities) == 3  # the tables still show what it said
    assert _codes(parse_completion(f"```json\n{CLEAN}\n```")) == ["fenced"]
    two = parse_completion(CLEAN + "\n" + json.dumps({"entities": [{"name": "Extra"}]}))
    assert _codes(two) == ["multiple"] and [e.name for e in two.entities][0] == "Acme Corp"
    assert _codes(parse_completion("I could not find any entities.")) == ["not_parsed"]
    assert _codes(parse_completion("I could not find any.", expect_json=False)) == []
    assert _codes(parse_completion('{"entities": [{"name": "A"}] oops }')) == ["not_parsed"]
    dropped = parse_completion('{"entities": [{"name": "A"}, {"foo": 1}, 5], "relations": "x"}')
    assert _codes(dropped) == ["dropped", "dropped"]
    assert "2 of 3 entities" in dropped.flags[0].message
    assert "'relations' is not a list" in dropped.flags[1].message
    stopped = parse_completion(CLEAN, finish_reason="length")
    assert _codes(stopped) == ["truncated"] and stopped.finish_reason == "length"


def test_json_cut_off_at_the_length_limit_is_flagged_not_shown_as_a_valid_small_answer():
    cut = CLEAN[: CLEAN.index("Paris") + 3]  # inside the third entity
    p = parse_completion(cut)
    assert _codes(p) == ["truncated"]
    # the two entities complete before the cut are shown, nothing is invented
    assert [e.name for e in p.entities] == ["Acme Corp", "Jane Doe"]
    # cut inside the first entity: nothing complete, no nested object passes for the answer
    early = parse_completion(CLEAN[:25])
    assert early.kind == "text" and "truncated" in _codes(early)
    assert "not_parsed" in _codes(early)
