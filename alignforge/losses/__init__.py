"""Loss functions as pure functions of tensors (torch only).

One concern per module: ``reduce`` (masked means, shard-invariant aggregation), ``logprobs``
(per-token log-probs), ``sft``, ``pairwise`` (Bradley-Terry reward models), ``preference`` (DPO
family, SPIN), ``reference_free`` (SimPO, ORPO), ``kto`` (KTO), ``ppo`` (clipped policy and value
losses), ``importance`` (off-policy correction).
Import what you need from the submodule, e.g. ``from alignforge.losses.preference import dpo_loss``.
"""
