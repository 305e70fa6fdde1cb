import pytest
import torch

from alignforge.losses.reduce import (
    aggregate_loss,
    masked_count,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

X = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_hand_values():
    assert masked_sum(X, M).item() == 6.0
    assert masked_sum(X, M, dim=-1).tolist() == [3.0, 3.0]
    assert masked_mean(X, M).item() == 2.0
    assert masked_mean(X, M, dim=-1).tolist() == [1.5, 3.0]


def test_nan_outside_the_mask_never_leaks():
    x = X.clone()
    x[0, 2] = float("nan")
    x[1, 1] = float("inf")
    assert masked_mean(x, M).item() == 2.0
    assert torch.isfinite(masked_var(x, M))
    assert torch.isfinite(masked_whiten(x, M)).all()


def test_empty_row_gives_zero_not_nan():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(X, mask, dim=-1).tolist() == [1.5, 0.0]
    assert masked_mean(X, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_hand_value():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([True, True, True, False])
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)


def test_masked_whiten_statistics():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = torch.rand(4, 7) > 0.3
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-4)


def test_bf16_mask_counts_exactly():
    mask = torch.ones(257, dtype=torch.bfloat16)
    assert masked_count(mask).item() == 257
    assert masked_mean(torch.ones(257), mask).item() == 1.0


def test_aggregate_modes_hand_values():
    assert aggregate_loss(X, M, "token_mean").item() == 2.0  # (1 + 2 + 3) / 3
    assert aggregate_loss(X, M, "seq_mean_token_sum").item() == 3.0  # (3 + 3) / 2
    assert aggregate_loss(X, M, "seq_mean_token_mean").item() == 2.25  # (1.5 + 3) / 2
    assert aggregate_loss(X, M, "token_mean", num_tokens=6).item() == 1.0


def _ragged_batch(seed=0, b=6, t=9):
    g = torch.Generator().manual_seed(seed)
    per_token = torch.randn(b, t, generator=g)
    lengths = torch.tensor([1, 9, 3, 7, 2, 5])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return per_token, mask


def test_two_shards_with_global_token_count_sum_to_full_batch():
    per_token, mask = _ragged_batch()
    full = aggregate_loss(per_token, mask, "token_mean")
    n = int(mask.sum())
    shards = [(0, 2), (2, 6)]  # 10 tokens and 17 tokens: unequal on purpose
    summed = sum(
        aggregate_loss(per_token[a:b], mask[a:b], "token_mean", num_tokens=n) for a, b in shards
    )
    torch.testing.assert_close(summed, full)
    # the naive alternative (average of per-shard means) is not invariant on this split
    naive = sum(aggregate_loss(per_token[a:b], mask[a:b], "token_mean") for a, b in shards) / 2
    assert abs(naive.item() - full.item()) > 1e-3


@pytest.mark.parametrize("mode", ["seq_mean_token_sum", "seq_mean_token_mean"])
def test_sequence_modes_shard_invariant_with_num_sequences(mode):
    per_token, mask = _ragged_batch(seed=1)
    full = aggregate_loss(per_token, mask, mode)
    summed = aggregate_loss(per_token[:1], mask[:1], mode, num_sequences=6) + aggregate_loss(
        per_token[1:], mask[1:], mode, num_sequences=6
    )
    torch.testing.assert_close(summed, full)


def test_aggregate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode='bogus'"):
        aggregate_loss(X, M, "bogus")
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate_loss(X, M, "seq_mean_token_mean", num_tokens=3)
    with pytest.raises(ValueError, match="num_sequences"):
        aggregate_loss(X, M, "token_mean", num_sequences=3)
