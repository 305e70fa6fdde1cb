"""The task metric as a PPO reward: ``reward_fn: alignforge.workflow.rewards:task_reward``.

The reward *is* the eval metric (one definition in the task). References are looked up by the
prompt's document text, read from ``references_file`` (JSONL rows of the task's format).
"""

from __future__ import annotations

_LOADED: dict[tuple, tuple] = {}  # (task, references_file, marginal) -> (task, keys)


def _references(task_name: str, references_file: str, marginal: bool = False) -> tuple:
    key = (task_name, references_file, bool(marginal))
    if key not in _LOADED:
        from alignforge.evaluate.runner import load_examples
        from alignforge.evaluate.tasks import get_task

        task = get_task(task_name, **({"marginal_reward": True} if marginal else {}))
        examples = load_examples(task, references_file, split="train")
        refs = [(_squash(ex.messages[-1]["content"]), ex.reference) for ex in examples]
        _LOADED[key] = (task, tuple(refs))
    return _LOADED[key]


def _squash(text: str) -> str:
    """Whitespace-free text: prompts are matched whatever way their parts were joined."""
    return "".join(str(text).split())


def _reference_for(prompt, keys: tuple):
    if isinstance(prompt, list):  # chat messages: the document is in the user turns
        prompt = " ".join(m["content"] for m in prompt if m.get("role") != "system")
    p = _squash(prompt)
    for text, ref in keys:
        if text and (text in p or p in text):
            return ref
    raise KeyError(f"no reference found for prompt {prompt[:80]!r}")


def task_reward(
    prompts,
    completions,
    task: str = "extraction",
    references_file: str = "",
    marginal: bool = False,
    **_,
):
    """One reward per completion against its prompt's reference: the task's per-item metric, or
    with ``marginal`` what the completion adds to the batch's dataset metric (``Task.rewards``)."""
    task_obj, keys = _references(task, references_file, bool(marginal))
    return task_obj.rewards(list(completions), [_reference_for(p, keys) for p in prompts])


def _state_dict() -> dict:
    """The marginal reward's pool of recently rewarded items, per loaded task (PPO checkpoints it)."""
    return {k: task._recent_rows for k, (task, _) in _LOADED.items()}


def _load_state_dict(state: dict) -> None:
    for k, rows in state.items():
        _references(*k)[0]._recent_rows = rows


task_reward.state_dict = _state_dict
task_reward.load_state_dict = _load_state_dict
