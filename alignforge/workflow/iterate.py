"""Iterative RLHF (seed lesson 6): every round samples from the *current* policy, judges the pairs,
trains the reward model, runs PPO with the drift monitor, merges the policy and evaluates it.

    alignforge iterate examples/iterate.yaml rounds=3

Each step writes ``round_<k>/<step>/`` and, when it finished, ``round_<k>/<step>.done.json``.
Re-running the same command skips finished steps and resumes unfinished ones (the training
recipes resume from their own checkpoints), so an interrupted run loses at most one step's
partial work.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from alignforge.config import ConfigError, save_config
from alignforge.workflow import steps
from alignforge.workflow.config import IterateConfig

# keys iterate fills in every round: set under rm: / ppo: they would be overwritten
RM_KEYS_SET_BY_ITERATE = ("stage", "model_name_or_path", "dataset", "eval_dataset", "output_dir")
PPO_KEYS_SET_BY_ITERATE = ("stage", "model_name_or_path", "dataset", "output_dir", "reward_model")
REWARD_FN_KEYS = ("reward_fn", "reward_fn_weight", "reward_fn_kwargs")
TASK_REWARD_FN = "alignforge.workflow.rewards:task_reward"


class Round:
    """Markers of the finished steps of a round (or of any directory of steps)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def done(self, step: str) -> dict | None:
        p = self.dir / f"{step}.done.json"
        return json.loads(p.read_text()) if p.exists() else None

    def finish(self, step: str, info: dict) -> dict:
        tmp = self.dir / f".{step}.done.json"
        tmp.write_text(json.dumps({**info, "finished_at": time.time()}, indent=1, default=str))
        tmp.replace(self.dir / f"{step}.done.json")
        return info


def _step(rnd: Round, name: str, fn, log) -> dict:
    if (info := rnd.done(name)) is not None:
        log(f"  {name}: done earlier, skipped")
        return info
    log(f"  {name} ...")
    t0 = time.perf_counter()
    info = fn()
    seconds = time.perf_counter() - t0
    log(f"  {name}: done in {seconds:.0f} s")
    return rnd.finish(name, {**info, "step_seconds": round(seconds, 1)})


def run_iterate(cfg: IterateConfig, log=print) -> list[dict]:
    from alignforge.evaluate.tasks import get_task

    validate(cfg)
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "iterate_config.yaml")
    task = get_task(cfg.task)
    rows = _rows(cfg.prompts)
    policy, rm_prev, history = cfg.policy, None, []
    for k in range(1, cfg.rounds + 1):
        log(f"round {k}/{cfg.rounds} (policy: {policy})")
        rnd = Round(root / f"round_{k}")
        info = _run_round(cfg, task, rows, rnd, k, policy, rm_prev, log)
        policy, rm_prev = info["policy"], info.get("rm") or rm_prev
        history.append(info)
    (root / "iterate_summary.json").write_text(json.dumps(history, indent=1, default=str))
    return history


def validate(cfg: IterateConfig) -> None:
    """Build the ``rm:`` and ``ppo:`` configs as the rounds will, before anything is sampled.

    A bad key or value is a ``ConfigError`` naming it now rather than after an hour of sampling
    and judging. PPO is built twice: for a round with a reward model and for one without (its
    judge kept fewer than ``min_pairs`` decisive pairs), whose reward is the task reward alone.
    """
    from alignforge.config import build_config
    from alignforge.config.rlhf import PPOConfig, RMConfig  # recipes.reward/ppo's CONFIG
    from alignforge.models import check_attn_implementation

    _check_keys(cfg)
    rnd_dir = Path(cfg.output_dir) / "round_1"
    prefs = rnd_dir / "judge" / "prefs"
    data = rm_data(cfg, cfg.policy, prefs / "train.jsonl", prefs / "validation.jsonl", rnd_dir)
    built = [build_config(RMConfig, data, "iterate.rm")]
    for rm_path, where in (
        (str(rnd_dir / "rm" / "final"), "iterate.ppo"),
        (None, "iterate.ppo (a round without a reward model)"),
    ):
        data = ppo_fields(cfg, cfg.policy, rm_path, rnd_dir, 1, log=lambda msg: None)
        built.append(build_config(PPOConfig, data, where))
    for stage_cfg in built:
        check_attn_implementation(getattr(stage_cfg, "attn_implementation", "sdpa"))


def _check_keys(cfg: IterateConfig) -> None:
    """Refuse ``rm:`` / ``ppo:`` keys that iterate would overwrite."""
    for name, given, owned in (
        ("rm", cfg.rm, RM_KEYS_SET_BY_ITERATE),
        ("ppo", cfg.ppo, PPO_KEYS_SET_BY_ITERATE),
    ):
        if clash := [key for key in owned if key in given]:
            raise ConfigError(
                f"{name}.{clash[0]}: iterate sets it in every round (from the round's policy, "
                f"judged pairs, prompts and directory); remove it from {name}:"
            )
    given = [key for key in REWARD_FN_KEYS if key in cfg.ppo]
    if given and cfg.task_reward_weight > 0:
        raise ConfigError(
            f"ppo.{given[0]}: iterate gives PPO the task reward as its reward_fn "
            f"(task_reward_weight={cfg.task_reward_weight}), which would replace yours; set "
            f"task_reward_weight: 0 to use your own reward_fn, or remove ppo.{given[0]}"
        )
    if given and "reward_fn" not in cfg.ppo:
        raise ConfigError(
            f"ppo.{given[0]}: there is no ppo.reward_fn for it to apply to "
            "(the task reward's weight is task_reward_weight)"
        )


def _rows(path: str) -> list[dict]:
    from alignforge.data import read_rows

    return read_rows(path)


def _run_round(cfg, task, rows, rnd: Round, k: int, policy: str, rm_prev, log) -> dict:
    chosen = random.Random(cfg.seed + k).sample(
        range(len(rows)), min(cfg.prompts_per_round, len(rows))
    )
    prompts, by_pid = steps.task_prompt_rows(task, rows, chosen)
    sample_dir, judge_dir = rnd.dir / "sample", rnd.dir / "judge"

    def do_sample():
        rows_ = steps.sample(
            policy,
            prompts,
            sample_dir,
            cfg.samples_per_prompt,
            cfg.temperature,
            cfg.max_new_tokens,
            cfg.split_ratios,
            cfg.seed + k,
            cfg.rollout_engine,
            cfg.rollout_base_url,
            cfg.rollout_model,
        )
        return {"prompts": len(rows_), "completions": sum(len(r["completions"]) for r in rows_)}

    _step(rnd, "sample", do_sample, log)
    samples = steps.read_jsonl(sample_dir / "samples.jsonl")
    steps.check_provenance(
        samples, policy, cfg.allow_offpolicy, cfg.ppo.get("offpolicy_correction", "none")
    )
    _step(
        rnd,
        "judge",
        lambda: steps.judge(
            sample_dir / "samples.jsonl",
            judge_dir,
            cfg.judge,
            cfg.judge_model,
            cfg.judge_endpoint,
            task,
            by_pid,
            cfg.panel,
        ),
        log,
    )
    train_prefs, val_prefs = steps.pref_files(judge_dir / "prefs")
    n_pairs = steps.count_rows(train_prefs)
    rm_path = _step(
        rnd,
        "rm",
        lambda: _train_rm(cfg, policy, rm_prev, train_prefs, val_prefs, rnd, n_pairs, log),
        log,
    ).get("rm")
    ppo = _step(rnd, "ppo", lambda: _train_ppo(cfg, policy, rm_path, rnd, k, log), log)
    new_policy = ppo["policy"]
    ev = (
        _step(rnd, "eval", lambda: _evaluate(cfg, task, new_policy, rnd, k), log)
        if cfg.eval_dataset
        else {}
    )
    return {"round": k, "policy": new_policy, "rm": rm_path, "pairs": n_pairs, "eval": ev}


def _train_rm(cfg, policy, rm_prev, train_prefs, val_prefs, rnd, n_pairs, log) -> dict:
    if n_pairs < cfg.min_pairs:
        log(
            f"  only {n_pairs} decisive pairs (< min_pairs={cfg.min_pairs}): no reward model this round"
        )
        return {"rm": None, "pairs": n_pairs, "skipped": True}
    from alignforge.config import build_config
    from alignforge.recipes import reward

    base = rm_prev if (cfg.continue_rm and rm_prev) else policy
    data = rm_data(cfg, base, train_prefs, val_prefs, rnd.dir)
    summary = reward.run(build_config(reward.CONFIG, data, "iterate.rm"))
    return {"rm": str(rnd.dir / "rm" / "final"), "pairs": n_pairs, "summary": _small(summary)}


def rm_data(cfg: IterateConfig, base: str, train_prefs, val_prefs, rnd_dir: Path) -> dict:
    """A round's reward-model config: ``cfg.rm`` on the round's judged pairs."""
    data = {
        "stage": "rm",
        "model_name_or_path": base,
        "dataset": str(train_prefs),
        "output_dir": str(rnd_dir / "rm"),
        **cfg.rm,
    }
    if val_prefs:
        data["eval_dataset"] = str(val_prefs)
    else:  # no validation prompts this round: hold out pairs of the training prompts
        data.setdefault("val_size", 0.2)
    return data


def ppo_data(
    cfg: IterateConfig, policy: str, rm_path: str | None, rnd: Round, k: int, log=print
) -> dict:
    """Round ``k``'s PPO config (see :func:`ppo_fields`), with the round's prompt file written."""
    from alignforge.evaluate.tasks import get_task

    # PPO reads chat prompts; the task turns its own rows (any format it knows) into them
    task = get_task(cfg.task)
    steps.write_jsonl(
        [{"prompt": task.example(r, i).messages} for i, r in enumerate(_rows(cfg.prompts))],
        rnd.dir / "ppo_prompts.jsonl",
    )
    return ppo_fields(cfg, policy, rm_path, rnd.dir, k, log)


def ppo_fields(
    cfg: IterateConfig, policy: str, rm_path: str | None, rnd_dir: Path, k: int, log=print
) -> dict:
    """Round ``k``'s PPO config: ``cfg.ppo`` on the round's policy, reward model and prompts.

    The seed moves with the round (``ppo.seed`` or ``seed``, plus ``k``), so every round draws
    a different order of prompts rather than replaying round 1's. The reward is the reward
    model plus the task reward (``task_reward_weight``), or the user's ``ppo.reward_fn`` when
    ``task_reward_weight`` is 0. In a round without a reward model, anything changed from what
    ``ppo:`` says (the drift monitor off, the task reward standing in) is logged on one line.
    """
    data = {
        "stage": "ppo",
        "model_name_or_path": policy,
        "dataset": str(rnd_dir / "ppo_prompts.jsonl"),
        "output_dir": str(rnd_dir / "ppo"),
        **cfg.ppo,
        "seed": int(cfg.ppo.get("seed", cfg.seed)) + k,
    }
    if rm_path:
        data["reward_model"] = rm_path
    elif cfg.ppo.get("drift_action", "none") != "none" and not data.get("drift_reference"):
        log(
            f"  ppo: no reward model this round, so no reward-model scores to watch: drift "
            f"monitor off (ppo.drift_action={cfg.ppo['drift_action']} applies to rounds with "
            "one; set ppo.drift_reference to watch these too)"
        )
        data["drift_action"] = "none"
    if cfg.task_reward_weight > 0 or not (rm_path or "reward_fn" in cfg.ppo):
        if cfg.task_reward_weight == 0:
            log(
                "  ppo: no reward model this round and no ppo.reward_fn: PPO runs on the "
                "task reward (weight 1.0) although task_reward_weight is 0"
            )
        data.update(
            reward_fn=TASK_REWARD_FN,
            reward_fn_weight=cfg.task_reward_weight or 1.0,
            reward_fn_kwargs={
                "task": cfg.task,
                "references_file": cfg.prompts,
                "marginal": cfg.task_reward == "marginal",
            },
        )
    return data


def _train_ppo(cfg, policy, rm_path, rnd, k, log=print) -> dict:
    from alignforge.config import build_config
    from alignforge.models import merge_adapter
    from alignforge.recipes import ppo

    data = ppo_data(cfg, policy, rm_path, rnd, k, log)
    summary = ppo.run(build_config(ppo.CONFIG, data, "iterate.ppo"))
    merged = merge_adapter(str(rnd.dir / "ppo" / "final"), str(rnd.dir / "policy"))
    return {"policy": str(merged), "summary": _small(summary)}


def _evaluate(cfg, task, policy, rnd, k) -> dict:
    from alignforge.evaluate.runner import SystemSpec, load_examples, run_eval

    examples = load_examples(task, cfg.eval_dataset, limit=cfg.eval_limit)
    res = run_eval(
        task,
        examples,
        [SystemSpec(name=f"round_{k}", model=policy)],
        rnd.dir / "eval",
        max_new_tokens=cfg.max_new_tokens,
        dataset=str(cfg.eval_dataset),
    )
    return {"results": str(rnd.dir / "eval" / "results.json"), "summary": _small(res)}


def _small(d) -> dict:
    """Keep the JSON-friendly scalar parts of a summary for the round's marker file."""
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(v, int | float | str | bool) or v is None}
