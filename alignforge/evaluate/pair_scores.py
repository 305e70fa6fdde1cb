"""What a model says about each answer of tokenized preference pairs, ``(N, 2)`` (chosen, rejected).

    from alignforge.evaluate.pair_scores import reward_scores, implicit_rewards, mean_token_logps
    s = reward_scores(rm, pairs, pad_id)            # a reward model's scores
    s = implicit_rewards(policy, pairs, pad_id)     # a LoRA policy: log pi - log pi_ref (adapter off)
    s = mean_token_logps(model, pairs, pad_id)      # a plain LM: mean log-prob per answer token
    f = last_token_features(lm, pairs, pad_id)      # (N, 2, H) what a score head reads

Pairs come from :func:`alignforge.data.preference.prepare_pairs`, so every model here reads the
pairs exactly as the reward model and DPO train on them: ``prompt_ids + answer_ids``, cut by one
rule. Reward-model sequences are left-padded and read at their last token, as in training.
"""

from __future__ import annotations

import numpy as np
import torch

from alignforge.data.preference import PreferencePair, collate_pairs


def sequences(pairs: list[PreferencePair]) -> list[list[int]]:
    """``prompt + chosen`` of every pair, then ``prompt + rejected`` of every pair."""
    return [p.prompt_ids + p.chosen_ids for p in pairs] + [
        p.prompt_ids + p.rejected_ids for p in pairs
    ]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _chunks(pairs, batch_size: int):
    for i in range(0, len(pairs), batch_size):
        yield pairs[i : i + batch_size]


def _as_pairs(values: list[float], n: int) -> np.ndarray:
    return np.stack([np.asarray(values[:n]), np.asarray(values[n:])], axis=1)


@torch.no_grad()
def reward_scores(rm, pairs: list[PreferencePair], pad_id: int, batch_size: int = 8) -> np.ndarray:
    """A :class:`~alignforge.models.heads.RewardModel`'s scores ``(N, 2)``."""
    from alignforge.models.heads import pad_left

    rm.eval()
    out = []
    for chunk in _chunks(pairs, batch_size):
        enc = pad_left(sequences(chunk), pad_id)
        s = rm(enc["input_ids"].to(_device(rm)), enc["attention_mask"].to(_device(rm)))
        out.append(_as_pairs(s.float().cpu().tolist(), len(chunk)))
    return np.concatenate(out)


@torch.no_grad()
def last_token_features(lm, pairs: list[PreferencePair], pad_id: int, batch_size: int = 8):
    """Final hidden state ``(N, 2, H)`` at the last token of each sequence: a score head's input."""
    from alignforge.models.heads import final_hidden_states, pad_left, score_index

    lm.eval()
    out = []
    for chunk in _chunks(pairs, batch_size):
        enc = pad_left(sequences(chunk), pad_id)
        ids, mask = enc["input_ids"].to(_device(lm)), enc["attention_mask"].to(_device(lm))
        hidden = final_hidden_states(lm, ids, mask)
        last = hidden[torch.arange(hidden.shape[0]), score_index(mask)].float().cpu().numpy()
        n = len(chunk)
        out.append(np.stack([last[:n], last[n:]], axis=1))
    return np.concatenate(out)


@torch.no_grad()
def answer_logps(model, pairs: list[PreferencePair], pad_id: int, batch_size: int = 8):
    """Summed log-probs ``(N, 2)`` of each answer given its prompt, and its token counts."""
    from alignforge.recipes.dpo import pair_logps
    from alignforge.training import to_device

    model.eval()
    logps, counts = [], []
    for chunk in _chunks(pairs, batch_size):
        plain = [PreferencePair(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in chunk]
        batch = to_device(collate_pairs(plain, pad_id, layout="padded"), _device(model))
        lp, n_tok = pair_logps(model, batch)
        logps.append(_as_pairs(lp.float().cpu().tolist(), len(chunk)))
        counts.append(_as_pairs(n_tok.cpu().tolist(), len(chunk)))
    return np.concatenate(logps), np.concatenate(counts)


def mean_token_logps(model, pairs, pad_id: int, batch_size: int = 8) -> np.ndarray:
    """Mean log-prob per answer token ``(N, 2)``: the base model's own preference."""
    logps, counts = answer_logps(model, pairs, pad_id, batch_size)
    return logps / np.maximum(counts, 1)


def implicit_rewards(policy, pairs, pad_id: int, batch_size: int = 8) -> np.ndarray:
    """DPO's implicit reward without beta, ``log pi(y|x) - log pi_ref(y|x)`` ``(N, 2)``, the
    reference being ``policy`` with its adapter switched off."""
    from alignforge.models import disabled_adapter

    if not hasattr(policy, "disable_adapter"):
        raise ValueError(
            "implicit_rewards: the policy must be a PEFT model (its reference is the adapter off)"
        )
    logps, _ = answer_logps(policy, pairs, pad_id, batch_size)
    with disabled_adapter(policy):
        ref, _ = answer_logps(policy, pairs, pad_id, batch_size)
    return logps - ref
