"""Chat templating with loss masks.

    ids, labels = tokenize_example(tokenizer, example)   # labels == -100 where no loss is taken

The conversation is rendered once with the tokenizer's own chat template. The character span
of each trainable message is found by rendering the conversation's prefixes (the template is
applied to ``messages[:i]`` with the generation prompt, then to ``messages[:i+1]``), so the
span covers exactly what the model must produce: the message text and the end-of-turn marker,
never the role header. Token labels come from the fast tokenizer's offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignforge.data.formats import ChatExample, Example, TextExample
from alignforge.data.readers import DataError

IGNORE = -100


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def trainable_spans(tokenizer, ex: ChatExample) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans to learn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the tokenizer has no chat template; use `formatting: text` or a chat model"
        )
    full = _render(tokenizer, ex.messages)
    spans = []
    for i, (msg, train) in enumerate(zip(ex.messages, ex.trainable, strict=True)):
        if not train:
            continue
        if i == 0:
            raise DataError("a conversation cannot start with a trained message; it needs a prompt")
        before = _render(
            tokenizer, ex.messages[:i], add_generation_prompt=msg["role"] == "assistant"
        )
        upto = _render(tokenizer, ex.messages[: i + 1])
        if not full.startswith(before) or not full.startswith(upto):
            raise DataError(
                "the chat template does not render conversations prefix-consistently "
                f"(message {i}); loss masks cannot be derived — use prompt/completion rows"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def _label_by_spans(tokenizer, text: str, spans, add_special_tokens: bool):
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = []
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(tok_id if inside else IGNORE)
    return ids, labels


def tokenize_example(tokenizer, ex: Example) -> Tokenized:
    """Token ids and labels (the id where the loss counts, -100 elsewhere)."""
    if isinstance(ex, ChatExample):
        text, spans = trainable_spans(tokenizer, ex)
        ids, labels = _label_by_spans(tokenizer, text, spans, add_special_tokens=False)
    elif isinstance(ex, TextExample):
        eos = tokenizer.eos_token or ""
        text = ex.text + eos
        spans = [(len(ex.prompt), len(text))]
        ids, labels = _label_by_spans(tokenizer, text, spans, add_special_tokens=True)
        if eos and ids and ids[-1] != tokenizer.eos_token_id:  # eos not split out as one token
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
    else:
        raise TypeError(f"unknown example type {type(ex).__name__}")
    return Tokenized(ids, labels)


def fit_length(tok: Tokenized, max_length: int, policy: str) -> Tokenized | None:
    """Apply the over-length policy: ``truncate`` keeps the first ``max_length`` tokens, ``drop``
    returns None. A result with no trainable token left is None too."""
    if len(tok) > max_length:
        if policy == "drop":
            return None
        tok = Tokenized(tok.input_ids[:max_length], tok.labels[:max_length], truncated=True)
    return tok if tok.n_label_tokens > 0 else None
