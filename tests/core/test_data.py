import json

import pytest

from alignforge.data import DataError, prepare_sft, read_rows, to_example, tokenize_example
from alignforge.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def learned(tok, t):
    return tok.decode([i for i, lab in zip(t.input_ids, t.labels, strict=True) if lab != -100])


def test_prompt_completion_learns_only_the_completion(tok):
    t = tokenize_example(
        tok, to_example({"prompt": "What is two plus two?", "completion": "Four."})
    )
    assert learned(tok, t) == "Four.<|im_end|>\n"
    assert tok.decode(t.input_ids).startswith("<|im_start|>user\nWhat is two plus two?")


def test_multi_turn_learns_every_assistant_turn_and_nothing_else(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    t = tokenize_example(tok, to_example({"messages": msgs}))
    assert learned(tok, t) == "Hello<|im_end|>\nCiao<|im_end|>\n"


def test_conversational_prompt_completion(tok):
    row = {
        "prompt": [{"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": "A"}],
    }
    assert learned(tok, tokenize_example(tok, to_example(row))) == "A<|im_end|>\n"


def test_alpaca_and_sharegpt_through_column_mapping(tok):
    row = {"q": "Add", "ctx": "1 and 2", "a": "3"}
    ex = to_example(row, "alpaca", {"instruction": "q", "input": "ctx", "output": "a"})
    assert ex.messages[-2]["content"] == "Add\n\n1 and 2"
    assert learned(tok, tokenize_example(tok, ex)) == "3<|im_end|>\n"
    share = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}
    assert learned(tok, tokenize_example(tok, to_example(share))) == "y<|im_end|>\n"


def test_text_learns_everything_and_appends_eos(tok):
    t = tokenize_example(tok, to_example({"text": "plain words"}))
    assert t.labels == t.input_ids and t.input_ids[-1] == tok.eos_token_id


def test_bad_row_fails_with_its_index_or_is_counted(tok):
    rows = [
        {"prompt": "a", "completion": "b"},
        {"prompt": "a"},
        {"messages": [{"role": "robot", "content": "x"}]},
    ]
    with pytest.raises(DataError, match="row 1: .*'completion' is missing|row 1: cannot tell"):
        prepare_sft(rows, tok, max_length=64)
    examples, stats = prepare_sft(rows, tok, max_length=64, skip_bad_rows=True)
    assert len(examples) == 1 and stats.bad_rows == 2
    assert "messages[0].role is 'robot'" in stats.bad_examples[1]


def test_overlong_examples_truncated_or_dropped_and_counted(tok):
    rows = [{"prompt": "short", "completion": "ok"}, {"prompt": "p", "completion": "word " * 200}]
    ex, st = prepare_sft(rows, tok, max_length=32, truncation="truncate")
    assert st.truncated == 1 and max(len(e) for e in ex) == 32
    ex, st = prepare_sft(rows, tok, max_length=32, truncation="drop")
    assert st.dropped_too_long == 1 and len(ex) == 1
    # a prompt longer than max_length leaves nothing to learn: dropped and counted
    ex, st = prepare_sft(
        [{"prompt": "word " * 200, "completion": "x"}, rows[0]], tok, max_length=32
    )
    assert st.dropped_no_labels == 1


def test_readers_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        read_rows(p)
    q = tmp_path / "latin.jsonl"
    q.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_rows(q)
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")


def test_readers_json_parquet_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "a"}, {"text": "b"}]
    (tmp_path / "x.json").write_text(json.dumps({"data": rows}))
    assert read_rows(tmp_path / "x.json") == rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "x.parquet")
    assert read_rows(tmp_path / "x.parquet") == rows
    d = tmp_path / "dir"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "validation.jsonl").write_text(json.dumps({"text": "c"}) + "\n")
    assert read_rows(d) == rows and read_rows(d, split="validation") == [{"text": "c"}]
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert read_rows(tmp_path / "hf") == rows


def write_jsonl(path, n, tag):
    path.write_text("".join(json.dumps({"text": f"{tag} {i}"}) + "\n" for i in range(n)))


def test_a_folder_is_read_by_split_never_whole(tmp_path):
    """A folder's files are read by the split their names give (🤗 datasets' names); the held-out
    split (``split="eval"``) must be one; a missing or ambiguous split is an error."""
    import datasets

    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "train.jsonl", 6, "train")
    write_jsonl(d / "test.jsonl", 2, "test")
    assert [r["text"] for r in read_rows(d)] == [f"train {i}" for i in range(6)]
    assert [r["text"] for r in read_rows(d, split="eval")] == ["test 0", "test 1"]
    write_jsonl(d / "dev.jsonl", 1, "dev")  # validation's alias, beside test: ambiguous
    with pytest.raises(DataError, match=r"more than one held-out split \(test, validation\)"):
        read_rows(d, split="eval")
    assert read_rows(d, split="validation") == [{"text": "dev 0"}]
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    write_jsonl(only_train / "train-00000-of-00002.jsonl", 2, "a")
    write_jsonl(only_train / "train-00001-of-00002.jsonl", 2, "b")
    assert len(read_rows(only_train)) == 4  # shards of one split
    with pytest.raises(DataError, match=r"no held-out split .*; has train-0"):
        read_rows(only_train, split="eval")
    write_jsonl(only_train / "notes.jsonl", 1, "?")
    with pytest.raises(DataError, match=r"no split in the name of notes.jsonl"):
        read_rows(only_train)
    plain = tmp_path / "plain"  # no file names a split: the folder is one dataset
    plain.mkdir()
    write_jsonl(plain / "a.jsonl", 1, "a")
    write_jsonl(plain / "b.jsonl", 1, "b")
    assert len(read_rows(plain, split="eval")) == 2
    splits = ("train", "validation", "test")
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list([{"text": s}]) for s in splits})
    dd.save_to_disk(str(tmp_path / "hf"))
    assert read_rows(tmp_path / "hf") == [{"text": "train"}]
    with pytest.raises(DataError, match="more than one held-out split"):
        read_rows(tmp_path / "hf", split="eval")
    datasets.DatasetDict({s: dd[s] for s in ("train", "test")}).save_to_disk(str(tmp_path / "hf2"))
    assert read_rows(tmp_path / "hf2", split="eval") == [{"text": "test"}]


def test_unpaired_preference_rows_are_refused_by_sft(tok):
    """TRL's KTO rows (prompt, completion, label) judge completions: SFT would learn the
    label: false ones. One test names the format; SFT refuses it, PPO still takes its prompts."""
    from alignforge.data.formats import detect_format, to_prompt

    rows = [
        {"prompt": "2 + 2?", "completion": "4", "label": True},
        {"prompt": "2 + 2?", "completion": "5", "label": False},
    ]
    assert detect_format(rows[1]) == "unpaired_preference"
    for formatting in ("auto", "prompt_completion"):
        with pytest.raises(
            DataError, match=r"train.jsonl row 0: unpaired preference data .*KTO.*loss_type: kto"
        ):
            prepare_sft(rows, tok, max_length=64, formatting=formatting, source="train.jsonl")
    assert to_prompt(rows[1]) == "2 + 2?"
    renamed = [{"q": "2 + 2?", "a": "5", "label": False}]
    with pytest.raises(DataError, match="unpaired preference data"):
        prepare_sft(renamed, tok, max_length=64, columns={"prompt": "q", "completion": "a"})
