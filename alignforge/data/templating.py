"""Chat templating with loss masks.

    set_chat_template(tokenizer, "chatml")               # or "default", "llama3", "my.jinja"...
    ids, labels = tokenize_example(tokenizer, example)   # labels == -100 where no loss is taken

:func:`render_chat` is the one place a conversation becomes text: SFT, the preference stages,
SPIN's and PPO's generation, ``alignforge generate`` and ``eval`` all call it, so the template a
run sets with :func:`set_chat_template` (the config's ``template:``) is the one every prompt is
formatted with, and the one saved with the tokenizer.

The conversation is rendered once with the tokenizer's chat template. The character span
of each trainable message is found by rendering the conversation's prefixes (the template is
applied to ``messages[:i]`` with the generation prompt, then to ``messages[:i+1]``), so the
span covers exactly what the model must produce: the message text and the end-of-turn marker,
never the role header. Token labels come from the fast tokenizer's offset mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignforge.data.formats import ChatExample, Example, TextExample
from alignforge.data.readers import DataError

IGNORE = -100

# Named templates, after LLaMA-Factory's names; each renders conversations prefix-consistently,
# which the loss masks need. ``default`` keeps the tokenizer's own.
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (  # Meta's Llama 3 Instruct template
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
        "{% if loop.index0 == 0 and bos_token %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}"
        "{{ 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.' }}{% endif %}{{ '\n\n' }}"
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + (eos_token or '') + '\n\n' }}"
        "{% endif %}{% endfor %}"
    ),
    "empty": (  # raw text: the contents one after another, EOS closing each answer
        "{% for message in messages %}{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token or '' }}{% endif %}{% endfor %}"
    ),
}
TEMPLATES["none"] = TEMPLATES["empty"]


def chat_template_source(template: str) -> str | None:
    """The Jinja source a ``template:`` setting names: None for ``default`` (the tokenizer's
    own), a named template's, or a file's text. A DataError (a ValueError) says what is wrong."""
    if template == "default":
        return None
    if template in TEMPLATES:
        return TEMPLATES[template]
    path = Path(template).expanduser()
    if not path.is_file():
        raise DataError(
            f"template {template!r} is neither a named template (default, "
            f"{', '.join(TEMPLATES)}) nor a Jinja file"
        )
    source = path.read_text(encoding="utf-8")
    import jinja2

    try:
        jinja2.Environment().parse(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"template {path} line {e.lineno}: not valid Jinja ({e.message})") from None
    return source


def set_chat_template(tokenizer, template: str):
    """Give ``tokenizer`` the chat template ``template`` names (``default`` keeps its own);
    ``save_pretrained`` then saves it with the model. Returns the tokenizer."""
    source = chat_template_source(template)
    if source is not None:
        tokenizer.chat_template = source
    return tokenizer


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """``messages`` as text in the tokenizer's chat template; with ``add_generation_prompt`` the
    text ends where the assistant's answer starts."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


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


def trainable_spans(tokenizer, ex: ChatExample) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans to learn."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the tokenizer has no chat template; set `template:` (chatml, llama3, alpaca, empty or "
            "a Jinja file), use `formatting: text` or a chat model"
        )
    full = render_chat(tokenizer, ex.messages)
    spans = []
    for i, (msg, train) in enumerate(zip(ex.messages, ex.trainable, strict=True)):
        if not train:
            continue
        if i == 0:
            raise DataError("a conversation cannot start with a trained message; it needs a prompt")
        before = render_chat(
            tokenizer, ex.messages[:i], add_generation_prompt=msg["role"] == "assistant"
        )
        upto = render_chat(tokenizer, ex.messages[: i + 1])
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
