import math

import pytest
import torch
import torch.nn.functional as F

from alignforge.losses.sft import sft_loss


def test_hand_value():
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [math.log(3.0), 0.0, 0.0], [5.0, 1.0, 0.0]]])
    out = sft_loss(logits, torch.tensor([[0, 2, 1]]))
    assert out.loss.item() == pytest.approx(-(math.log(0.5) + math.log(0.2)) / 2, rel=1e-6)
    assert out.n_tokens.item() == 2


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 8, 17, generator=g)
    labels = torch.randint(0, 17, (5, 8), generator=g)
    prompt_len = torch.tensor([2, 5, 1, 3, 6])
    pad_from = torch.tensor([8, 7, 4, 8, 7])
    pos = torch.arange(8)[None]
    labels[(pos < prompt_len[:, None]) | (pos >= pad_from[:, None])] = -100
    return logits, labels


def test_equals_cross_entropy():
    logits, labels = _batch()
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(sft_loss(logits, labels).loss, expected)


def test_micro_batches_with_global_num_tokens_equal_full_batch():
    logits, labels = _batch(seed=1)
    full_logits = logits.clone().requires_grad_(True)
    full = sft_loss(full_logits, labels)
    full.loss.backward()

    acc_logits = logits.clone().requires_grad_(True)
    n = int(full.n_tokens)
    total = 0.0
    for a, b in [(0, 1), (1, 4), (4, 5)]:
        part = sft_loss(acc_logits[a:b], labels[a:b], num_tokens=n)
        part.loss.backward()  # gradients accumulate as in gradient accumulation
        total = total + part.loss.detach()
    torch.testing.assert_close(total, full.loss.detach())
    torch.testing.assert_close(acc_logits.grad, full_logits.grad)
