"""Normalise dataset rows into one of two shapes the tokenizer step understands.

Accepted row formats (``formatting: auto`` detects them in this order):

| format | columns | trained tokens |
|---|---|---|
| ``messages`` | ``messages: [{role, content}, ...]`` | every assistant turn |
| ``prompt_completion`` | ``prompt``, ``completion`` (strings or message lists) | the completion only |
| ``alpaca`` | ``instruction``, ``input``?, ``output``, ``system``?, ``history``? | the output (and history answers) |
| ``sharegpt`` | ``conversations: [{from, value}, ...]`` | every ``gpt`` turn |
| ``text`` | ``text`` | every token |

TRL's unpaired preference rows (``prompt``, ``completion`` and ``label``: the KTO format) are
detected as ``unpaired_preference`` and refused here: they judge completions, and an SFT run would
learn the ``label: false`` ones too. :func:`is_unpaired_preference` is the one test of it.

A ``columns`` mapping renames a dataset's own columns onto these names, e.g.
``columns: {prompt: question, completion: answer}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from alignforge.data.readers import DataError

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
}


@dataclass
class ChatExample:
    """A conversation; ``trainable[i]`` says whether message i's tokens are learned."""

    messages: list[dict]
    trainable: list[bool]


@dataclass
class TextExample:
    """Plain text; the ``prompt`` prefix (if any) is masked from the loss."""

    text: str
    prompt: str = ""
    meta: dict = field(default_factory=dict)


Example = ChatExample | TextExample


UNPAIRED_PREFERENCE = "unpaired_preference"


def is_unpaired_preference(row: dict) -> bool:
    """TRL's unpaired preference row (the KTO format): ``prompt``, ``completion`` and ``label``
    (whether the completion is desirable). The one test of the format: SFT refuses such rows,
    the preference stage (:mod:`alignforge.data.kto`) reads them."""
    return all(k in row for k in ("prompt", "completion", "label"))


def detect_format(row: dict) -> str:
    if is_unpaired_preference(row):
        return UNPAIRED_PREFERENCE
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "text" in row:
        return "text"
    raise DataError(
        f"cannot tell the format from columns {sorted(row)}; expected one of: messages, "
        "prompt+completion, instruction+output (alpaca), conversations (sharegpt), text — "
        "or set `formatting:` and a `columns:` mapping"
    )


def _check_messages(msgs, what: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{what} must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{what}[{j}] must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{what}[{j}].role is {m['role']!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{what}[{j}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _as_messages(value, role: str, what: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _check_messages(value, what)


def _from_messages(row):
    msgs = _check_messages(row["messages"], "messages")
    trainable = [m["role"] == "assistant" for m in msgs]
    if not any(trainable):
        raise DataError("messages has no assistant turn to learn from")
    return ChatExample(msgs, trainable)


def _from_prompt_completion(row, plain: bool):
    prompt, completion = row["prompt"], row["completion"]
    if plain and isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise DataError("completion is empty")
        return TextExample(prompt + completion, prompt)
    p = _as_messages(prompt, "user", "prompt")
    c = _as_messages(completion, "assistant", "completion")
    if not any(m["content"] for m in c):
        raise DataError("completion is empty")
    return ChatExample(p + c, [False] * len(p) + [m["role"] == "assistant" for m in c])


def _from_alpaca(row):
    instruction, inp, output = (
        row.get("instruction") or "",
        row.get("input") or "",
        row.get("output"),
    )
    if not isinstance(output, str) or not output:
        raise DataError("output is missing or empty")
    if not instruction and not inp:
        raise DataError("instruction and input are both empty")
    msgs, trainable = [], []
    if row.get("system"):
        msgs.append({"role": "system", "content": row["system"]})
        trainable.append(False)
    for turn in row.get("history") or []:
        if not (isinstance(turn, list | tuple) and len(turn) == 2):
            raise DataError("history entries must be [question, answer] pairs")
        msgs += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        trainable += [False, True]
    user = instruction + ("\n\n" + inp if inp else "") if instruction else inp
    msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    trainable += [False, True]
    return ChatExample(msgs, trainable)


def _from_sharegpt(row):
    conv = row["conversations"]
    if not isinstance(conv, list) or not conv:
        raise DataError("conversations must be a non-empty list")
    msgs = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"conversations[{j}] must have 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise DataError(
                f"conversations[{j}].from is {turn['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}"
            )
        msgs.append({"role": role, "content": str(turn["value"])})
    if row.get("system"):
        msgs.insert(0, {"role": "system", "content": row["system"]})
    return _from_messages({"messages": msgs})


def _from_text(row):
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataError("text is missing or empty")
    return TextExample(text)


def to_example(
    row: dict,
    formatting: str = "auto",
    columns: dict[str, str] | None = None,
    plain_strings: bool = False,
) -> Example:
    """Turn one row into an Example; raises DataError naming the field that is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"row is a {type(row).__name__}, not an object")
    if columns:
        row = dict(row)
        for target, source in columns.items():
            if source not in row:
                raise DataError(
                    f"column {source!r} (mapped to {target!r}) is missing; row has {sorted(row)}"
                )
            row[target] = row[source]
    fmt = detect_format(row) if formatting == "auto" else formatting
    if fmt in ("prompt_completion", UNPAIRED_PREFERENCE) and is_unpaired_preference(row):
        raise DataError(
            "unpaired preference data (TRL's KTO format: prompt, completion, label); "
            "SFT would learn its label: false completions too. Train on it with stage: dpo, "
            "loss_type: kto (docs/dpo_spin.md), or keep the label: true rows, without label, for SFT"
        )
    required = {
        "messages": ["messages"],
        "prompt_completion": ["prompt", "completion"],
        "alpaca": ["output"],
        "sharegpt": ["conversations"],
        "text": ["text"],
    }[fmt]
    missing = [c for c in required if c not in row]
    if missing:
        raise DataError(
            f"column {missing[0]!r} is missing for formatting={fmt}; row has {sorted(row)}"
        )
    if fmt == "messages":
        return _from_messages(row)
    if fmt == "prompt_completion":
        return _from_prompt_completion(row, plain_strings)
    if fmt == "alpaca":
        return _from_alpaca(row)
    if fmt == "sharegpt":
        return _from_sharegpt(row)
    return _from_text(row)


def to_prompt(row: dict, formatting: str = "auto", columns: dict[str, str] | None = None):
    """The prompt of a row, for methods that sample their own answers (PPO, GRPO, RLOO).

    A ``prompt`` column alone (a string or a message list), or the prompt of an unpaired
    preference row, is the prompt as it is. Any other
    format is read as :func:`to_example` reads it (ShareGPT roles mapped, alpaca's system and
    history kept) and its messages up to the last trainable turn are the prompt; a row without
    an answer (alpaca without ``output``) is read with an empty one.
    """
    if columns:
        row = {**row, **{t: row[s] for t, s in columns.items() if s in row}}
    prompt_only = "completion" not in row or is_unpaired_preference(row)
    if formatting in ("auto", "prompt_completion") and "prompt" in row and prompt_only:
        p = row["prompt"]
        return p if isinstance(p, str) and p.strip() else _check_messages(p, "prompt")
    if formatting in ("auto", "alpaca") and "instruction" in row and not row.get("output"):
        row = {**row, "output": "-"}
    ex = to_example(row, formatting, columns=None)
    if isinstance(ex, TextExample):
        if not ex.prompt:
            raise DataError("a text row has no prompt to sample from; use a `prompt` column")
        return ex.prompt
    last = max(i for i, t in enumerate(ex.trainable) if t)
    return ex.messages[:last]


def read_prompts(
    path: str | list[str],
    formatting="auto",
    columns=None,
    max_samples=None,
    skip_bad=False,
    mix_strategy="concat",
    interleave_probs=None,
    seed=42,
) -> list:
    """The prompts of one or more data files (:func:`to_prompt` per row), several mixed by
    ``mix_strategy`` (:mod:`alignforge.data.mix`); a bad row names its file and row."""
    from alignforge.data.mix import mix_rows
    from alignforge.data.readers import read_rows

    paths = [path] if isinstance(path, str) else list(path)
    rows = mix_rows([read_rows(p) for p in paths], paths, mix_strategy, interleave_probs, seed)
    rows = rows.select(range(min(max_samples, len(rows)))) if max_samples else rows
    prompts = []
    for i, row in enumerate(rows):
        try:
            prompts.append(to_prompt(row, formatting, columns))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{rows.where(i)}: {e}") from None
    if not prompts:
        raise DataError(f"{', '.join(paths)}: no prompts")
    return prompts
