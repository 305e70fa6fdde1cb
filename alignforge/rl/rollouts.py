"""Where PPO's rollout batches come from, and how far ahead of training they are drawn.

    make, sync = engine_factory("server", model=policy, tokenizer=tok, base_urls=[url], ...)
    source = RolloutSource(prompt_ids, batch_size=8, seed=0, sampling=Sampling(1, 1.0, 1.0, 32),
                           max_staleness=1, total=100, make_engine=make, sync=sync,
                           background=True, scatter=True)
    pairs = source.next(step)     # this process's [(prompt index, Rollout)] for PPO step `step`

Batch ``g`` holds the prompts of PPO step ``g``. It is submitted at the start of step
``g - max_staleness`` (all batches up to ``max_staleness`` at step 0), so it is drawn by the
policy of step ``max(0, g - max_staleness)`` and each of its rollouts carries that version. With
the server engine a background thread draws it while the trainer trains: a step then costs about
max(generate, train) instead of their sum. The in-process engine shares the trainer's model and
cores, so it draws the same batch on the spot, without overlap. Either way the off-policy
correction (``offpolicy_correction``) and its ``offpolicy/*`` diagnostics account for the lag.

Processes: with the in-process engine each process draws its share of every batch; with servers,
process 0 draws the whole batch (one client, one weight sync) and each process takes its share
when the step starts. Each prompt is seeded by its index and the batch number, so its rollouts do
not depend on the process or the server that drew them.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from alignforge.rollout.base import Rollout, RolloutEngine, build_rollout_engine

Pairs = list[tuple[int, Rollout]]


@dataclass(frozen=True)
class Sampling:
    n: int  # samples per prompt
    temperature: float
    top_p: float
    max_new_tokens: int


def engine_factory(
    kind: str, *, model, tokenizer, adapter: str, precision: str = "same", batch_size: int = 8,
    base_urls: str | list[str] | None = None, served_model: str | None = None, folder=None,
    keep: int = 1, main: bool = True,
) -> tuple[Callable[[int], RolloutEngine] | None, object]:  # fmt: skip
    """``(make_engine, sync)``: ``make_engine(version)`` is the engine that draws with the
    policy's weights at that version, ``sync`` the :class:`WeightSync` putting them on the
    servers (None in process). A process other than ``main`` draws nothing with servers."""
    if kind == "transformers":
        from alignforge.rollout.batch import behaviour_model

        def in_process(version: int) -> RolloutEngine:
            sampler = behaviour_model(model, precision, adapter)
            return build_rollout_engine("transformers", model=sampler, tokenizer=tokenizer,
                                        policy_version=str(version), batch_size=batch_size)  # fmt: skip

        return in_process, None
    if not main:
        return None, None
    from alignforge.rollout.transformers_engine import eos_token_ids
    from alignforge.rollout.weight_sync import WeightSync

    sync = WeightSync(base_urls, folder, keep=keep, adapter=adapter)
    sync.check()
    engine = build_rollout_engine("server", tokenizer=tokenizer, base_urls=base_urls,
                                  served_model=served_model, eos_token_ids=eos_token_ids(model, tokenizer))  # fmt: skip
    if served_model is not None:
        engine.check()

    def on_server(version: int) -> RolloutEngine:
        return engine.at(sync.publish(model, version), str(version))

    return on_server, sync


class RolloutSource:
    """The batches of a PPO run, drawn ``max_staleness`` steps ahead (see the module)."""

    def __init__(
        self, prompt_ids: list[list[int]], *, batch_size: int, seed: int, sampling: Sampling,
        max_staleness: int, total: int, make_engine: Callable[[int], RolloutEngine] | None,
        sync=None, background: bool = False, scatter: bool = False, rank: int = 0,
        world: int = 1, broadcast: Callable | None = None,
    ):  # fmt: skip
        self.prompt_ids, self.batch_size, self.seed = prompt_ids, batch_size, seed
        self.sampling, self.max_staleness, self.total = sampling, max_staleness, total
        self.make_engine, self.sync = make_engine, sync
        self.scatter, self.rank, self.world, self.broadcast = scatter, rank, world, broadcast
        self.draws = not scatter or rank == 0  # this process submits batches
        self.pending: deque[Future] = deque()
        self.generated = 0  # batches submitted so far
        self._pool = (
            ThreadPoolExecutor(1, "alignforge-rollouts") if background and self.draws else None
        )

    def indices(self, gen_index: int, rank: int) -> list[int]:
        """Process ``rank``'s prompts of batch ``gen_index``: a fixed permutation per epoch, the
        global batch split into contiguous shares by rank."""
        bs, n = self.batch_size, len(self.prompt_ids)
        share = bs // self.world
        out = []
        for k in range(gen_index * bs + rank * share, gen_index * bs + (rank + 1) * share):
            epoch, j = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(int(perm[j]))
        return out

    def _submit(self, gen_index: int, version: int) -> None:
        ranks = range(self.world) if self.scatter else [self.rank]
        idx = [i for r in ranks for i in self.indices(gen_index, r)]
        seeds = [(self.seed * 1_000_003 + gen_index) * 100_003 + i for i in idx]
        prompts, s = [self.prompt_ids[i] for i in idx], self.sampling
        engine = self.make_engine(version)  # here, between updates: the weights of `version`

        def draw() -> Pairs:
            groups = engine.generate(prompts, n=s.n, temperature=s.temperature, top_p=s.top_p,
                                     max_new_tokens=s.max_new_tokens, seed=seeds)  # fmt: skip
            return [(i, r) for i, g in zip(idx, groups, strict=True) for r in g]

        if self._pool is not None:
            self.pending.append(self._pool.submit(draw))
        else:
            self.pending.append(_done(draw()))

    def next(self, step: int) -> Pairs:
        """This process's rollouts for PPO step ``step`` (the policy is at version ``step``)."""
        batch = None
        if self.draws:  # keep max_staleness batches in the queue after this one (none past the end)
            while len(self.pending) <= self.max_staleness and (
                self.generated < self.total or not self.pending
            ):
                self._submit(self.generated, step)
                self.generated += 1
            batch = self.pending.popleft().result()
        if not self.scatter:
            return batch
        if self.world > 1:
            batch = self.broadcast(batch)
        share = len(batch) // self.world
        return batch[self.rank * share : (self.rank + 1) * share]

    def state(self) -> list:
        """The batches submitted but not trained on yet (waits for those being drawn)."""
        return [[(i, dataclasses.asdict(r)) for i, r in f.result()] for f in self.pending]

    def load_state(self, queue: list, generated: int) -> None:
        """Back to a checkpoint's batches; what was being drawn is dropped, the servers forget
        the versions loaded since (the policy went back)."""
        wait(list(self.pending))
        self.pending = deque(_done([(i, Rollout(**r)) for i, r in b]) for b in queue)
        self.generated = generated
        if self.sync is not None:
            self.sync.reset()

    def close(self, unload: bool = False) -> None:
        """Stop drawing; ``unload``: the servers unload the versions this run loaded."""
        if self._pool is not None:
            self._pool.shutdown(wait=unload, cancel_futures=True)
        if unload and self.sync is not None:
            self.sync.reset()


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def server_failure(err, step: int, checkpoint) -> Exception:
    """The one-line error of a rollout server that stopped answering at PPO step ``step``."""
    from alignforge.errors import UserError

    if not getattr(err, "endpoint_down", False):
        return err
    saved = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved yet"
    return UserError(f"rollout server failed at PPO step {step + 1}: {err}; {saved}; once the "
                     "server is back, run the same command to resume")  # fmt: skip
