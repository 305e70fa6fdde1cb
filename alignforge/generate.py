"""``alignforge generate``: chat with a model, or batch-generate answers for a file of prompts.

alignforge generate default -p "Name three rivers in France."
alignforge generate runs/sft/final --input prompts.jsonl --output answers.jsonl
alignforge generate runs/sft/final -p "Hi" --base-url http://127.0.0.1:8000/v1

Generation goes through a rollout engine: the model in this process, or (``--base-url``) an
OpenAI-compatible server (``alignforge serve``, vLLM) given the prompts as token ids of the
model's tokenizer and chat template.
"""

from __future__ import annotations

import json
import sys

from alignforge.data import DataError, read_rows
from alignforge.data.templating import set_chat_template


def _messages(row: dict | str, system: str | None) -> list[dict]:
    if isinstance(row, str):
        msgs = [{"role": "user", "content": row}]
    elif "messages" in row:
        msgs = [
            m for m in row["messages"] if m["role"] != "assistant" or m is not row["messages"][-1]
        ]
    elif "prompt" in row:
        p = row["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
    else:
        raise DataError(f"a row needs `prompt` or `messages`; this one has {sorted(row)}")
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


def _row_messages(rows, idx: int, system: str | None) -> list[dict]:
    try:
        return _messages(rows[idx], system)
    except DataError as e:
        raise DataError(f"{rows.where(idx)}: {e}") from None


def generate_batch(
    engine, tokenizer, conversations: list[list[dict]], max_new_tokens=256, temperature=0.0,
    top_p=1.0, seed: int | None = None,
) -> list[str]:  # fmt: skip
    """The answers of ``engine`` (a :class:`~alignforge.rollout.base.RolloutEngine`) to chat
    conversations: greedy at temperature 0, else sampled (under ``seed`` when given)."""
    from alignforge.rollout.transformers_engine import chat_prompt_ids

    ids = [chat_prompt_ids(tokenizer, c) for c in conversations]
    groups = engine.generate(ids, temperature=temperature, top_p=top_p, greedy=temperature <= 0,
                             max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    return [r.text for [r] in groups]


def load_engine(model_name: str, template: str, batch_size: int, base_url: str | None = None,
                served_model: str | None = None):  # fmt: skip
    """``(engine, tokenizer)``: ``model_name`` in this process, or (``base_url``) the server
    there, to which prompts go as token ids of ``model_name``'s tokenizer and chat template."""
    from alignforge.config import ConfigError
    from alignforge.models import load_model, load_tokenizer
    from alignforge.rollout import build_rollout_engine

    if served_model and not base_url:
        raise ConfigError("--served-model names a model on a server: give --base-url too")
    tok = set_chat_template(load_tokenizer(model_name), template)
    if base_url:
        engine = build_rollout_engine("server", tokenizer=tok, base_urls=base_url,
                                      served_model=served_model)  # fmt: skip
        engine.check()
        return engine, tok
    engine = build_rollout_engine("transformers", model=load_model(model_name).eval(),
                                  tokenizer=tok, batch_size=batch_size)  # fmt: skip
    return engine, tok


def run_generate(
    model_name,
    prompts,
    input_path,
    output_path,
    max_new_tokens,
    temperature,
    top_p,
    system,
    batch_size,
    template="default",
    base_url=None,
    served_model=None,
):
    from tqdm.auto import tqdm

    rows = read_rows(input_path) if input_path else []  # a bad file fails before the model loads
    convs = [_row_messages(rows, i, system) for i in range(len(rows))]
    engine, tok = load_engine(model_name, template, batch_size, base_url, served_model)
    gen = lambda convs: generate_batch(engine, tok, convs, max_new_tokens, temperature, top_p)  # noqa: E731
    if input_path:
        sink = open(output_path, "w") if output_path else sys.stdout
        for i in tqdm(
            range(0, len(rows), batch_size), desc="generate", disable=output_path is None
        ):
            chunk = rows[i : i + batch_size]
            for row, answer in zip(chunk, gen(convs[i : i + batch_size]), strict=True):
                sink.write(json.dumps({**row, "generation": answer}) + "\n")
        if output_path:
            sink.close()
        return
    if prompts:
        for p, answer in zip(prompts, gen([_messages(p, system) for p in prompts]), strict=True):
            print(f">>> {p}\n{answer}\n")
        return
    _chat(gen, system)


def _chat(gen, system):
    history = [{"role": "system", "content": system}] if system else []
    print("Chat; an empty line or Ctrl-D quits, /reset clears the history.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        answer = gen([history])[0]
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")
