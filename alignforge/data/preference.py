"""Preference pairs: read, normalise, tokenize, truncate, and batch them without padding waste.

    rows = read_rows("examples/data/dpo_en_demo.json")
    pairs, stats = prepare_pairs(rows, tokenizer, max_length=512)
    batch = collate_pairs(pairs[:4], pad_id=tokenizer.pad_token_id, layout="packed")

Accepted row formats (``formatting: auto`` detects them in this order):

| format | columns | prompt |
|---|---|---|
| ``sharegpt`` | ``conversations: [{from, value}]``, ``chosen: {from, value}``, ``rejected: {from, value}``, ``system``? | the conversation |
| ``explicit`` | ``prompt`` (string or messages), ``chosen``, ``rejected`` (string, one message or messages) | ``prompt`` |
| ``implicit`` | ``chosen``, ``rejected``: two conversations that share a prefix | the shared prefix |

Every format takes an optional numeric ``margin`` column (the offset ``m`` of ODPO-style losses).
``columns: {prompt: question, chosen: good, rejected: bad}`` maps a dataset's own column names.

Tokenization follows the chat template: the prompt is rendered with ``add_generation_prompt=True``
by :func:`render_prompt` (SPIN's generation uses the same function, so what the model sees at
generation time is what it is trained on), and each response is what the rendered
``prompt + response`` adds after the longest common token prefix with the prompt.

Length, one rule for every preference stage (reward model, DPO, SPIN), for a reward model
scoring one answer, and for ``alignforge eval --task preference``: a prompt longer than
``max_prompt_length`` (default ``max_length // 2``) keeps its *last* ``max_prompt_length`` tokens,
and each answer keeps its *first* ``max_length - len(prompt)`` tokens. The prompt's end is what
the answer replies to; the answer's start is what the model reads first. What a sequence keeps
depends on its prompt and its own answer only, so a reward model scores an answer alone exactly
as it saw it in its pair, and both answers of a pair share one prompt. No pair is dropped for
length (``truncation="drop"`` drops every pair the rule would cut instead). A pair whose answers
are equal once cut is dropped. All are counted in :class:`PreferenceStats`.

Batch layouts (:func:`collate_pairs`), all giving the same per-sequence log-probs:

* ``padded``: 2B rows (chosen rows, then rejected rows), right-padded (what TRL does).
* ``packed``: sequences laid end to end in rows of at most ``pack_length`` tokens, positions
  restarting at 0 for each (which is all that marks them: no ``attention_mask``; the model's
  attention backend gets a block-diagonal mask or varlen boundaries from
  :func:`alignforge.models.attention.attention_inputs`); no padding except at row ends.
* ``shared``: one segment per pair, ``prompt + chosen + rejected``; rejected tokens attend to the
  prompt and to themselves, never to the chosen tokens, and their positions continue from the
  prompt's end. The prompt is encoded once for both responses. This needs a boolean
  ``(B, 1, T, T)`` mask, which flash attention cannot take.

Every layout returns flat target lists (``tgt_row``, ``tgt_pred``, ``tgt_id``, ``tgt_seq``): the
token ``tgt_id`` of sequence ``tgt_seq`` is predicted by the logits at row ``tgt_row``, position
``tgt_pred``. For ordinary layouts ``tgt_pred`` is the token's own position minus one (the causal
shift); in ``shared`` the first rejected token is predicted from the prompt's last position.
Sequence ``i`` is the chosen response of pair ``i``, sequence ``P + i`` its rejected response.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch

from alignforge.data.formats import SHAREGPT_ROLES, _check_messages
from alignforge.data.mix import row_name
from alignforge.data.readers import DataError
from alignforge.data.templating import render_chat

PAIR_FORMATS = ("auto", "sharegpt", "explicit", "implicit")
LAYOUTS = ("padded", "packed", "shared")


@dataclass
class PreferencePair:
    """One tokenized pair. Response ids exclude the prompt; ``ref`` holds cached reference
    log-probs ``(chosen, rejected)`` once computed."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None
    truncated: bool = False
    index: int = -1  # row index in the source
    ref: tuple[float, float] | None = None
    lengths: tuple[int, int] | None = None  # (chosen, rejected) response tokens before truncation
    prompt_key: str = ""  # the same for every pair of one prompt (its tokens before truncation)

    def __len__(self) -> int:  # tokens of the two sequences, as trained without sharing
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    def key(self) -> str:
        blob = json.dumps([self.prompt_ids, self.chosen_ids, self.rejected_ids])
        return hashlib.sha1(blob.encode()).hexdigest()


@dataclass
class PreferenceStats:
    rows: int = 0
    used: int = 0
    truncated: int = 0  # pairs cut to max_length (prompt, answers or both)
    prompt_truncated: int = 0  # ... whose prompt lost its start
    answer_truncated: int = 0  # ... whose longer answer lost its end
    dropped_too_long: int = 0  # truncation="drop" only
    dropped_identical: int = 0  # chosen == rejected once truncated
    bad_rows: int = 0
    with_margin: int = 0
    tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bad_examples"] = d["bad_examples"][:20]
        return d


# ---------------------------------------------------------------- rows -> (prompt, chosen, rejected)


def _sharegpt_messages(turns, what: str) -> list[dict]:
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{what} must be a {{from, value}} message or a non-empty list of them")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{what}[{j}] must have 'from' and 'value'")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise DataError(
                f"{what}[{j}].from is {t['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}"
            )
        out.append({"role": role, "content": str(t["value"])})
    return out


def _messages(value, role: str, what: str) -> list[dict]:
    """A string, one message dict ({role, content} or {from, value}) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return _sharegpt_messages(value, what)
    return _check_messages(value, what)


def detect_pair_format(row: dict) -> str:
    if "conversations" in row and "chosen" in row and "rejected" in row:
        return "sharegpt"
    if "prompt" in row and "chosen" in row and "rejected" in row:
        return "explicit"
    if "chosen" in row and "rejected" in row:
        return "implicit"
    raise DataError(
        f"cannot tell the preference format from columns {sorted(row)}; expected "
        "prompt+chosen+rejected (explicit), chosen+rejected conversations (implicit) or "
        "conversations+chosen+rejected (sharegpt) — or set `formatting:` and a `columns:` mapping"
    )


def split_pair(
    row: dict, formatting: str = "auto", columns: dict[str, str] | None = None
) -> tuple[list[dict], list[dict], list[dict], float | None]:
    """``(prompt_messages, chosen_messages, rejected_messages, margin)`` of one row.

    Raises DataError naming the field: missing columns, empty sides, chosen equal to rejected.
    """
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
    fmt = detect_pair_format(row) if formatting == "auto" else formatting
    need = {"sharegpt": ["conversations"], "explicit": ["prompt"], "implicit": []}[fmt]
    for col in [*need, "chosen", "rejected"]:
        if col not in row or row[col] is None:
            raise DataError(
                f"column {col!r} is missing for formatting={fmt}; row has {sorted(row)}"
            )
    for side in ("chosen", "rejected"):
        if row[side] in ("", [], {}):
            raise DataError(f"{side} is empty")
    if fmt == "sharegpt":
        prompt = _sharegpt_messages(row["conversations"], "conversations")
        if row.get("system"):
            prompt = [{"role": "system", "content": str(row["system"])}, *prompt]
        chosen = _messages(row["chosen"], "assistant", "chosen")
        rejected = _messages(row["rejected"], "assistant", "rejected")
    elif fmt == "explicit":
        prompt = _messages(row["prompt"], "user", "prompt")
        chosen = _messages(row["chosen"], "assistant", "chosen")
        rejected = _messages(row["rejected"], "assistant", "rejected")
    else:
        chosen_all = _messages(row["chosen"], "assistant", "chosen")
        rejected_all = _messages(row["rejected"], "assistant", "rejected")
        n = 0
        while n < min(len(chosen_all), len(rejected_all)) and chosen_all[n] == rejected_all[n]:
            n += 1
        if n == 0:
            raise DataError("chosen and rejected share no prompt prefix (implicit format)")
        prompt, chosen, rejected = chosen_all[:n], chosen_all[n:], rejected_all[n:]
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or not any(m["content"].strip() for m in msgs):
            raise DataError(f"{side} is empty")
        if msgs[0]["role"] != "assistant":
            raise DataError(f"{side} must start with an assistant message, got {msgs[0]['role']!r}")
    if chosen == rejected:
        raise DataError("chosen equals rejected; the pair carries no preference")
    margin = row.get("margin")
    if margin is not None:
        try:
            margin = float(margin)
        except (TypeError, ValueError):
            raise DataError(f"margin must be a number, got {margin!r}") from None
    return prompt, chosen, rejected, margin


# ---------------------------------------------------------------- tokenization


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The prompt text a chat model continues: the template with ``add_generation_prompt=True``.

    Used for training pairs and for SPIN's generations alike.
    """
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer, prompt, chosen, rejected) -> tuple[list[int], list[int], list[int]]:
    """``(prompt_ids, chosen_ids, rejected_ids)`` with the tokenizer's chat template.

    The response is what ``prompt + response`` adds after its longest common token prefix with
    the prompt (usually the whole prompt; less when tokens merge across the boundary).
    Without a chat template the messages' contents are concatenated and EOS ends each response.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        p = "".join(m["content"] for m in prompt)
        eos = tokenizer.eos_token or ""
        p_ids = tokenizer(p)["input_ids"]
        full = [
            tokenizer(p + "".join(m["content"] for m in r) + eos)["input_ids"]
            for r in (chosen, rejected)
        ]
    else:
        p_ids = _encode(tokenizer, render_prompt(tokenizer, prompt))
        full = [_encode(tokenizer, render_chat(tokenizer, prompt + r)) for r in (chosen, rejected)]
    n = min(_common_prefix(p_ids, full[0]), _common_prefix(p_ids, full[1]))
    return p_ids[:n], full[0][n:], full[1][n:]


def prompt_budget(max_length: int, max_prompt_length: int | None) -> int:
    """The most prompt tokens a sequence keeps: ``max_prompt_length``, by default half of
    ``max_length``."""
    budget = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 < budget < max_length:
        raise ValueError(
            f"max_prompt_length: must be between 1 and max_length - 1 ({max_length - 1}), "
            f"got {budget}"
        )
    return budget


def cut(
    prompt: list[int], answer: list[int], max_length: int, max_prompt_length: int | None = None
) -> tuple[list[int], list[int]]:
    """The module doc's length rule on one sequence: the prompt's last ``max_prompt_length``
    tokens, then the answer's first ``max_length - len(prompt)``."""
    keep = min(len(prompt), prompt_budget(max_length, max_prompt_length))
    return prompt[len(prompt) - keep :], answer[: max_length - keep]


def fit_pair(
    pair: PreferencePair, max_length: int, truncation: str, max_prompt_length: int | None = None
) -> PreferencePair | str:
    """Apply the length rule of the module doc; returns the pair or the reason it is dropped
    (``"too_long"`` or ``"identical"``)."""
    prompt, chosen = cut(pair.prompt_ids, pair.chosen_ids, max_length, max_prompt_length)
    rejected = cut(pair.prompt_ids, pair.rejected_ids, max_length, max_prompt_length)[1]
    if (len(prompt), len(chosen), len(rejected)) == (
        len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids),
    ):  # fmt: skip
        return pair
    if truncation == "drop":
        return "too_long"
    if chosen == rejected:
        return "identical"
    return PreferencePair(
        prompt, chosen, rejected, pair.margin, True, pair.index, None, pair.lengths, pair.prompt_key
    )


def encode_answer(
    tokenizer, prompt, answer, max_length: int, max_prompt_length: int | None = None
) -> list[int]:
    """``prompt + answer`` token ids of one answer (a string, message or messages), cut as in
    a pair: what a reward model reads when it scores an answer alone."""
    p = _messages(prompt, "user", "prompt")
    a = _messages(answer, "assistant", "answer")
    p_ids, a_ids, _ = tokenize_pair(tokenizer, p, a, a)
    p_ids, a_ids = cut(p_ids, a_ids, max_length, max_prompt_length)
    return p_ids + a_ids


def prepare_pairs(
    rows: list[dict],
    tokenizer,
    max_length: int,
    truncation: str = "truncate",
    formatting: str = "auto",
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    source: str = "dataset",
    max_prompt_length: int | None = None,
) -> tuple[list[PreferencePair], PreferenceStats]:
    """Tokenize preference rows and fit them to ``max_length`` (:func:`fit_pair`); a bad row
    raises with its index unless ``skip_bad_rows`` (then it is counted in ``stats.bad_rows``)."""
    prompt_budget(max_length, max_prompt_length)  # a bad budget fails before any row is read
    stats = PreferenceStats(rows=len(rows))
    out: list[PreferencePair] = []
    for idx, row in enumerate(rows):
        try:
            prompt, chosen, rejected, margin = split_pair(row, formatting, columns)
            ids = tokenize_pair(tokenizer, prompt, chosen, rejected)
            if ids[1] == ids[2]:
                raise DataError("chosen equals rejected once tokenized")
            if not ids[0]:
                raise DataError("the prompt has no tokens")
            if not ids[1] or not ids[2]:
                raise DataError("a response has no tokens after the prompt")
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{row_name(rows, idx, source)}: {e}") from None
            stats.bad_rows += 1
            stats.bad_examples.append(f"{row_name(rows, idx, source)}: {e}")
            continue
        lengths = (len(ids[1]), len(ids[2]))
        key = hashlib.sha1(json.dumps(ids[0]).encode()).hexdigest()[:16]
        pair = PreferencePair(*ids, margin=margin, index=idx, lengths=lengths, prompt_key=key)
        fitted = fit_pair(pair, max_length, truncation, max_prompt_length)
        if fitted == "too_long":
            stats.dropped_too_long += 1
            continue
        if fitted == "identical":
            stats.dropped_identical += 1
            continue
        stats.truncated += fitted.truncated
        stats.prompt_truncated += len(fitted.prompt_ids) < len(ids[0])
        stats.answer_truncated += max(len(fitted.chosen_ids), len(fitted.rejected_ids)) < max(
            lengths
        )
        stats.with_margin += margin is not None
        stats.tokens += len(fitted)
        out.append(fitted)
    stats.used = len(out)
    if not out:
        raise DataError(f"{source}: no usable pairs out of {len(rows)} rows ({stats.as_dict()})")
    return out, stats


def pairs_hash(pairs: list[PreferencePair]) -> str:
    """Identity of a tokenized data set (token ids of every pair, in order)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(p.key().encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- batching


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        for r, free in enumerate(space):
            if lengths[i] <= free:
                rows[r].append(i)
                space[r] -= lengths[i]
                break
        else:
            rows.append([i])
            space.append(capacity - lengths[i])
    return rows


def _segments(pairs: list[PreferencePair], layout: str) -> list[list[tuple]]:
    """Each segment is a list of (ids, positions, seq_id or -1, parent) parts laid out in one
    attention block; ``parent`` is the part index the part attends to besides itself (-1: none)."""
    P = len(pairs)
    segs = []
    for i, p in enumerate(pairs):
        n = len(p.prompt_ids)
        if layout == "shared":
            segs.append(
                [
                    (p.prompt_ids, list(range(n)), -1, -1),
                    (p.chosen_ids, list(range(n, n + len(p.chosen_ids))), i, 0),
                    (p.rejected_ids, list(range(n, n + len(p.rejected_ids))), P + i, 0),
                ]
            )
        else:
            for ids, s in ((p.chosen_ids, i), (p.rejected_ids, P + i)):
                segs.append(
                    [
                        (p.prompt_ids, list(range(n)), -1, -1),
                        (ids, list(range(n, n + len(ids))), s, 0),
                    ]
                )
    return segs


def collate_pairs(
    pairs: list[PreferencePair], pad_id: int, layout: str = "packed", pack_length: int | None = None
) -> dict:
    """Batch pairs for one forward pass over every chosen and rejected response (see module doc).

    Returns ``input_ids`` (B, T), ``attention_mask`` ((B, T) for ``padded``, a boolean
    (B, 1, T, T) for ``shared``, none for ``packed``), ``position_ids`` (B, T) unless padded,
    the flat targets ``tgt_row``,
    ``tgt_pred``, ``tgt_id``, ``tgt_seq`` (N,), ``n_pairs``, ``resp_len`` (2P,) response token
    counts, ``margin`` (P,) if any pair has one, and ``ref_logps`` (2P,) if every pair has them.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(LAYOUTS)}")
    segs = _segments(pairs, layout)
    seg_len = [sum(len(part[0]) for part in s) for s in segs]
    if layout == "padded":
        rows = [[j] for j in range(len(segs))]
    else:
        rows = _first_fit(seg_len, max(pack_length or 0, max(seg_len)))
    width = max(sum(seg_len[j] for j in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    block = torch.full((B, width), -1, dtype=torch.long)  # segment (attention block) id
    part_of = torch.full((B, width), -1, dtype=torch.long)  # part index within the segment
    parent = torch.full((B, width), -1, dtype=torch.long)
    tgt_row, tgt_pred, tgt_id, tgt_seq = [], [], [], []
    for b, row in enumerate(rows):
        start = 0
        for j in row:
            part_start = []
            for k, (p_ids, p_pos, seq, par) in enumerate(segs[j]):
                n = len(p_ids)
                part_start.append(start)
                ids[b, start : start + n] = torch.tensor(p_ids, dtype=torch.long)
                pos[b, start : start + n] = torch.tensor(p_pos, dtype=torch.long)
                block[b, start : start + n] = j
                part_of[b, start : start + n] = k
                parent[b, start : start + n] = par
                if seq >= 0:
                    # token t of this part is predicted by the previous token of its own part,
                    # or, for the first, by the parent part's last token
                    prev = [part_start[par] + len(segs[j][par][0]) - 1] + list(
                        range(start, start + n - 1)
                    )
                    tgt_row += [b] * n
                    tgt_pred += prev
                    tgt_id += list(p_ids)
                    tgt_seq += [seq] * n
                start += n
    P = len(pairs)
    out = {
        "input_ids": ids,
        "tgt_row": torch.tensor(tgt_row, dtype=torch.long),
        "tgt_pred": torch.tensor(tgt_pred, dtype=torch.long),
        "tgt_id": torch.tensor(tgt_id, dtype=torch.long),
        "tgt_seq": torch.tensor(tgt_seq, dtype=torch.long),
        "n_pairs": P,
        "resp_len": torch.tensor(
            [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs],
            dtype=torch.float32,
        ),
    }
    if layout == "padded":
        out["attention_mask"] = (block >= 0).long()
    else:  # packed: restarting positions mark the sequences; shared needs its own mask
        out["position_ids"] = pos
        if layout == "shared":
            out["attention_mask"] = _block_mask(block, part_of, parent)[:, None]
    if any(p.margin is not None for p in pairs):
        out["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    if all(p.ref is not None for p in pairs):
        out["ref_logps"] = torch.tensor(
            [p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32
        )
    return out


def _block_mask(block: torch.Tensor, part: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
    """(B, T, T) boolean: query i sees key j iff j <= i, both in the same segment, and key j is
    in query i's own part or in its parent part. Padding sees only itself (finite softmax)."""
    T = block.shape[1]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None]
    same_block = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
    own = part[:, :, None] == part[:, None, :]
    from_parent = parent[:, :, None] == part[:, None, :]
    pad_self = torch.eye(T, dtype=torch.bool)[None] & (block[:, :, None] < 0)
    return (same_block & causal & (own | from_parent)) | pad_self
