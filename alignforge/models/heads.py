"""Scalar heads on a causal LM's last hidden state: reward models and value models (critics).

    from alignforge.models.heads import RewardModel, ScalarHead, load_reward_model
    rm = RewardModel(lm, ScalarHead(lm.config.hidden_size))   # lm: plain or LoRA-wrapped causal LM
    scores = rm(input_ids, attention_mask)                     # (B,): one score per sequence
    rm.save("runs/rm/final", tokenizer)
    rm = load_reward_model("runs/rm/final")
    rm.score(["What is 2+2?"], ["4"])                          # [float]

Score position: the reward is read from the final hidden state at the **last non-pad token**
(``score_index``: the last position where ``attention_mask`` is 1), for left and right padding
alike. Position ids are rebuilt from the mask so left padding does not shift positions. The LM
head is never run: the hidden states come from the inner transformer (``lm.base_model``), which
with LoRA already carries the adapter's injected layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

HEAD_FILE = "score_head.safetensors"
META_FILE = "alignforge_reward_model.json"


def score_index(attention_mask: Tensor) -> Tensor:
    """Index of the last attended token per row: ``(B, T) -> (B,)`` int64; works for any padding."""
    valid = attention_mask.bool()
    if not valid.any(dim=-1).all():
        raise ValueError("a row of attention_mask is all padding: no token to score")
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return torch.where(valid, positions, -1).max(dim=-1).values


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """``cumsum(mask) - 1`` clamped at 0: the positions a left-padded row would have unpadded."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def transformer_of(lm) -> nn.Module:
    """The inner transformer (no LM head) of a causal LM, a PEFT-wrapped one included."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.base_model


def final_hidden_states(lm, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Last-layer hidden states ``(B, T, H)`` of ``lm`` with the currently active adapter."""
    out = transformer_of(lm)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


class ScalarHead(nn.Module):
    """``h -> w.h + b``: one scalar per position, ``(..., H) -> (...)`` in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # As in TRL's value head: small weights so early scores stay near zero.
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


class RewardModel(nn.Module):
    """A causal LM (plain, or with a LoRA adapter) plus a ``ScalarHead`` read at the last token."""

    def __init__(
        self,
        lm,
        head: ScalarHead,
        tokenizer=None,
        max_length: int = 1024,
        max_prompt_length: int | None = None,
    ):
        super().__init__()
        self.lm, self.head = lm, head
        self.tokenizer, self.max_length = tokenizer, max_length
        self.max_prompt_length = max_prompt_length

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores ``(B,)`` from ``input_ids``/``attention_mask`` ``(B, T)``."""
        hidden = final_hidden_states(self.lm, input_ids, attention_mask)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, score_index(attention_mask)])

    def save(self, path: str | Path, tokenizer=None, meta: dict | None = None) -> Path:
        """Write the adapter (or full model), the head and the tokenizer into ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(path, safe_serialization=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
            path / HEAD_FILE,
        )
        tok = tokenizer or self.tokenizer
        if tok is not None:
            tok.save_pretrained(path)
        info = {
            "score_position": "last_non_pad_token",
            "hidden_size": self.head.summary.in_features,
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "adapter": hasattr(self.lm, "peft_config"),
            **(meta or {}),
        }
        (path / META_FILE).write_text(json.dumps(info, indent=1))
        return path

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str], batch_size: int = 8) -> list[float]:
        """Scores of prompt/completion pairs (prompts as strings or message lists)."""
        if self.tokenizer is None:
            raise ValueError(
                "RewardModel.score needs a tokenizer (pass tokenizer= or use load_reward_model)"
            )
        ids = [
            encode_pair(self.tokenizer, p, c, self.max_length, self.max_prompt_length)
            for p, c in zip(prompts, completions, strict=True)
        ]
        device = next(self.parameters()).device
        out: list[float] = []
        for i in range(0, len(ids), batch_size):
            batch = pad_left(ids[i : i + batch_size], self.tokenizer.pad_token_id)
            out += self(batch["input_ids"].to(device), batch["attention_mask"].to(device)).tolist()
        return out


def encode_pair(
    tokenizer, prompt, completion, max_length: int, max_prompt_length: int | None = None
) -> list[int]:
    """Token ids of prompt + completion (chat template when the tokenizer has one), cut by the
    rule every preference stage trains with: the prompt's last ``max_prompt_length`` tokens
    (default ``max_length // 2``) and the completion's first ones
    (:func:`alignforge.data.preference.encode_answer`). The score is read at the last kept token.
    """
    from alignforge.data.preference import encode_answer

    return encode_answer(tokenizer, prompt, completion, max_length, max_prompt_length)


def pad_left(seqs: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Left-pad id lists into ``input_ids`` and ``attention_mask`` ``(B, T)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_reward_model(
    path: str | Path, dtype: str = "float32", cache: str | None = None
) -> RewardModel:
    """Load a reward model written by ``RewardModel.save`` (``stage: rm``), in eval mode."""
    from safetensors.torch import load_file

    from alignforge.models import load_model, load_tokenizer

    path = Path(path)
    if not (path / HEAD_FILE).exists():
        raise FileNotFoundError(
            f"{path} is not a reward model: no {HEAD_FILE} (train one with `stage: rm`)"
        )
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).exists() else {}
    lm = load_model(str(path), dtype=dtype, cache=cache)
    head = ScalarHead(lm.config.hidden_size)
    head.load_state_dict(load_file(path / HEAD_FILE))
    tok = load_tokenizer(str(path), cache)
    rm = RewardModel(
        lm, head, tok, int(meta.get("max_length", 1024)), meta.get("max_prompt_length")
    )
    return rm.eval().requires_grad_(False)
