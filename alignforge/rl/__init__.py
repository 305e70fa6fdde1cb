"""RL building blocks on tensors (torch only): ``kl`` (KL estimators and controllers),
``advantages`` (GAE, GRPO, RLOO, REINFORCE++), ``rewards`` (score + KL reward shaping) and
``drift`` (reward-drift monitor). Masked reductions live in :mod:`alignforge.losses.reduce`.
"""
