"""A panel of simulated annotators that judges through the store exactly as people do.

    from alignforge.annotate.panel import run_panel
    from alignforge.annotate.reference import ReferenceJudge, read_references
    judge = ReferenceJudge(read_references("gold.jsonl"), cfg.reference_measures)
    run = run_panel(store, judge, cfg.panel, {a.key: a.question for a in cfg.aspects}, cfg.scale)
    run.judged, run.accuracy          # {'sim-1': 40, ...}, each one's agreement with the judge

    alignforge annotate simulate ann/ --reference gold.jsonl --annotators 3 --flip-rate 0.1

Each annotator ``sim-1`` ... ``sim-k`` is a user of the project, marked simulated and without
a token. In turns, each claims its next item (``Store.next_item``: its own order, sides drawn
at random and stored), reads the judge's verdict as the sides are shown, answers every aspect
with its noise and submits with a submission id (``Store.submit``). Queues, overlap, skips,
agreement, rates and alerts therefore see them as they see people, while exports, the
dashboard and ``stats`` keep them apart (``role`` 'simulated'). An item the judge cannot
answer (no gold answer) is skipped, as a person would, and the skip is audited.

The noise, per aspect, with d the judge's verdict as shown (+ = the side shown first is
better) and n the items this annotator judged earlier in this session (one ``run_panel``):

1. with probability ``position_bias``: the side shown first (+max(1, |d|)), whatever d is;
2. else, when d is decisive: a tie with probability ``tie_rate``, else the other side (−d)
   with probability ``flip_rate + fatigue * n / 100`` (fatigue stops adding at 1/2), else d;
3. else (the judge says tie): a tie.

Two annotators with flip rate p (and no other noise) thus agree on (1 − p)² + p² of the
decisive aspects, and with position bias b an annotator prefers the side shown first on
b + (1 − b)/2 of them. Every draw comes from the annotator's own generator, seeded by
``seed`` and its name, so a panel run on the same project state repeats exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, NamedTuple

from alignforge.annotate.agreement import decisive_agreement, rater_accuracy
from alignforge.annotate.config import Noise, PanelConfig
from alignforge.annotate.judge import JudgeError, PairVerdict, item_judge


class PanelCeiling(NamedTuple):
    agreement: float  # share of agreeing pairs of decisive judgements of one item (overall)
    n_pairs: int
    rater_accuracy: float  # each label's chance of the true side: the RM ceiling on one label


def panel_ceiling(store) -> PanelCeiling:
    """The simulated annotators' agreement and what it implies (``agreement.rater_accuracy``)."""
    directions: dict[int, dict[str, int]] = {}
    with store.connect() as conn:
        for j in store.judgements(conn):
            if j.role == "simulated":
                directions.setdefault(j.item_id, {})[j.user] = _sign(j.overall)
    agreement, n = decisive_agreement(directions)
    return PanelCeiling(agreement, n, rater_accuracy(agreement))


class PanelRun(NamedTuple):
    judged: dict[str, int]  # annotator -> items judged in this session
    accuracy: dict[str, float]  # share of their decisive judgements on the judge's side
    skipped: int  # items skipped because the judge could not answer them
    errors: list[str]  # the first reasons for those skips


def flip_probability(noise: Noise, n_done: int) -> float:
    """The flip rate after ``n_done`` items of a session: fatigue adds, up to 1/2."""
    grown = noise.flip_rate + noise.fatigue * n_done / 100.0
    return min(grown, max(noise.flip_rate, 0.5))


def simulated_answer(
    truth: dict[str, int], noise: Noise, n_done: int, rng: random.Random
) -> dict[str, int]:
    """The annotator's display-side scores for the judge's display-side verdict ``truth``."""
    p_flip = flip_probability(noise, n_done)
    out = {}
    for aspect, d in truth.items():
        u_bias, u_tie, u_flip = rng.random(), rng.random(), rng.random()  # fixed draws per aspect
        if u_bias < noise.position_bias:
            out[aspect] = max(1, abs(d))
        elif d == 0 or u_tie < noise.tie_rate:
            out[aspect] = 0
        else:
            out[aspect] = -d if u_flip < p_flip else d
    return out


def run_panel(
    store, judge: Any, panel: PanelConfig, questions: dict[str, str], scale: str = "ab",
    max_items: int | None = None, group: str = "default",
) -> PanelRun:  # fmt: skip
    """One session of the panel over the released items: each annotator judges until its queue
    is empty or it has judged ``max_items``. ``judge``: anything ``run_judge`` takes."""
    ask: Callable[[dict, dict[str, str], str], PairVerdict] = item_judge(judge)
    verdicts: dict[int, PairVerdict | JudgeError] = {}
    with store.connect() as conn:
        users = [store.simulated_user(conn, f"sim-{k + 1}", group) for k in range(panel.annotators)]
        rngs = [random.Random(f"{panel.seed}:{u.name}") for u in users]
        noises = [panel.noise(k) for k in range(panel.annotators)]
        done, hits, decisive = [0] * len(users), [0] * len(users), [0] * len(users)
        skipped, errors = 0, []
        active = list(range(len(users)))
        while active:
            for k in list(active):
                user = users[k]
                served = None if max_items is not None and done[k] >= max_items else \
                    store.next_item(conn, user, rng_seed=rngs[k].getrandbits(32))  # fmt: skip
                if served is None:
                    active.remove(k)
                    continue
                it = store.item(conn, served.item_id)
                if served.item_id not in verdicts:
                    try:
                        verdicts[served.item_id] = ask(it, questions, scale)
                    except JudgeError as e:
                        verdicts[served.item_id] = e
                v = verdicts[served.item_id]
                if isinstance(v, JudgeError):
                    store.skip(conn, user, served.item_id)
                    skipped += 1
                    errors.append(str(v))
                    continue
                sign = -1 if served.swapped else 1
                shown = {a: sign * s for a, s in v.scores.items()}
                answer = simulated_answer(shown, noises[k], done[k], rngs[k])
                store.submit(conn, user, served.item_id, f"{user.name}-{served.item_id}", answer)
                done[k] += 1
                truth, mine = _sign(sum(v.scores.values())), _sign(sign * sum(answer.values()))
                if truth and mine:
                    decisive[k] += 1
                    hits[k] += truth == mine
    names = [u.name for u in users]
    accuracy = {n: hits[k] / decisive[k] for k, n in enumerate(names) if decisive[k]}
    return PanelRun(dict(zip(names, done, strict=True)), accuracy, skipped, errors[:20])


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)
