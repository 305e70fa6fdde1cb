"""``alignforge generate``: chat with a model, or batch-generate answers for a file of prompts.

alignforge generate default -p "Name three rivers in France."
alignforge generate runs/sft/final --input prompts.jsonl --output answers.jsonl
"""

from __future__ import annotations

import json
import sys

import torch

from alignforge.data import DataError, read_rows
from alignforge.data.templating import render_chat, set_chat_template


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


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens=256,
    temperature=0.0,
    top_p=1.0,
) -> list[str]:
    """Left-padded batched generation from chat messages; returns the decoded answers."""
    tokenizer.padding_side = "left"
    texts = [render_chat(tokenizer, c, add_generation_prompt=True) for c in conversations]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    sample = temperature > 0
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


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
):
    from tqdm.auto import tqdm

    from alignforge.models import load_model, load_tokenizer

    rows = read_rows(input_path) if input_path else []  # a bad file fails before the model loads
    convs = [_row_messages(rows, i, system) for i in range(len(rows))]
    model = load_model(model_name).eval()
    tok = set_chat_template(load_tokenizer(model_name), template)
    gen = lambda convs: generate_batch(model, tok, convs, max_new_tokens, temperature, top_p)  # noqa: E731
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
