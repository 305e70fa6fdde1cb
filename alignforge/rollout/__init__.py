"""Generation engines behind one interface, each returning token ids, behaviour log-probs and
the policy version: :class:`TransformersEngine` (in process) and :class:`ServerEngine` (vLLM or
``alignforge serve`` over HTTP), built by :func:`build_rollout_engine` (or, for a saved
checkpoint, which the servers are then given, :func:`checkpoint_engine`); :class:`WeightSync` puts
a trained policy on those servers; :class:`OpenAIChatClient` talks to any OpenAI-compatible
endpoint; the server itself is :mod:`alignforge.rollout.server`.

Heavy modules are imported on first attribute access so ``import alignforge.rollout`` is cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Rollout": "alignforge.rollout.base",
    "RolloutEngine": "alignforge.rollout.base",
    "build_rollout_engine": "alignforge.rollout.base",
    "checkpoint_engine": "alignforge.rollout.base",
    "ServerEngine": "alignforge.rollout.server_engine",
    "WeightSync": "alignforge.rollout.weight_sync",
    "OpenAIClient": "alignforge.rollout.openai_client",
    "TransformersEngine": "alignforge.rollout.transformers_engine",
    "chat_prompt_ids": "alignforge.rollout.transformers_engine",
    "OpenAIChatClient": "alignforge.rollout.openai_client",
    "TransformersChatClient": "alignforge.rollout.openai_client",
    "ChatResult": "alignforge.rollout.openai_client",
    "EndpointError": "alignforge.rollout.openai_client",
    "json_constraint": "alignforge.rollout.constrained",
    "schema_from_response_format": "alignforge.rollout.constrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'alignforge.rollout' has no attribute {name!r}")
