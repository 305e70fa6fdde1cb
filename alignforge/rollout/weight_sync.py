"""The trainer's policy, put on the rollout servers after each update.

    sync = WeightSync(["http://127.0.0.1:8000/v1"], "runs/ppo/rollout_policy", keep=2)
    sync.check()                                   # at start: servers up, loading routes there
    name = sync.publish(model, version=3)          # -> "policy-step-3", loaded on every server
    engine.at(name, "3").generate(prompts, ...)

**LoRA** (a peft model): the policy adapter alone (peft ``save_pretrained`` with
``selected_adapters=[adapter]``: the critic's adapter and value head are not sent) is written to
a slot folder and loaded on every server as ``policy-step-{version}`` with vLLM's
``POST /v1/load_lora_adapter {"lora_name", "lora_path"}``. Once ``keep`` newer versions are
loaded, the oldest is unloaded (``/v1/unload_lora_adapter``) and its folder reused, so at most
``keep`` versions are loaded and ``keep`` folders written; ``keep`` must cover every version
still being sampled (asynchronous rollouts: ``max_staleness + 1``). A name the server already
holds (a run resumed against a server that kept its adapters) is unloaded and loaded again, so
a request never meets an older adapter under the same name.

**Full weights**: the model (and tokenizer) are saved to ``full/`` and
``POST /v1/load_weights {"path", "policy_version"}`` (``alignforge serve``'s own route) replaces
the served weights between batches; requests keep naming the served model. A model already on
disk (SPIN's merged iteration, a workflow round's policy) is loaded from where it is
(:meth:`WeightSync.load_saved`). vLLM's OpenAI server
cannot reload full weights over HTTP: :meth:`WeightSync.check` refuses it at start.

The adapter travels as a file, which the server must be able to read at the same path (same
machine or a shared filesystem). This is the route vLLM documents for runtime LoRA
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); TRL's vLLM server mode and OpenRLHF broadcast merged
weights over NCCL instead, which needs their worker extension and a process group shared with
the engine. A LoRA adapter weighs megabytes, so a file works with a stock ``vllm serve``.
"""

from __future__ import annotations

from pathlib import Path

from alignforge.errors import UserError
from alignforge.rollout.openai_client import EndpointError, OpenAIClient

PREFIX = "policy-step-"
_ROUTE_HELP = {
    "load_lora_adapter": "start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
    "`vllm serve MODEL --enable-lora --max-lora-rank R`, or use alignforge serve",
    "load_weights": "vLLM's OpenAI server cannot reload full weights; train a LoRA policy "
    "(finetuning_type: lora) or serve the model with alignforge serve",
}


class WeightSync:
    """Publishes policy versions to the servers at ``base_urls``; ``adapter=None`` sends full
    weights (with ``tokenizer``) instead of the peft adapter of that name."""

    def __init__(
        self,
        base_urls: str | list[str],
        folder: str | Path,
        *,
        keep: int = 1,
        adapter: str | None = "default",
        tokenizer=None,
        api_key: str | None = None,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        self.clients = [OpenAIClient(u, api_key) for u in urls]
        self.folder = Path(folder).resolve()
        self.keep, self.adapter, self.tokenizer = int(keep), adapter, tokenizer
        self.loaded: dict[int, str] = {}  # version -> adapter name, on every server

    @property
    def route(self) -> str:
        return "load_weights" if self.adapter is None else "load_lora_adapter"

    def check(self, hint: str | None = None) -> None:
        """Every server answers and has the loading route: an empty request is refused as
        invalid (400), not as an unknown route (404/405), which is reported with ``hint`` (what
        to do instead; default: the route's own)."""
        for c in self.clients:
            try:
                c.post(self.route, {})
            except EndpointError as e:
                if e.status in (404, 405):
                    raise UserError(
                        f"{e.url}: HTTP {e.status}: {hint or _ROUTE_HELP[self.route]}"
                    ) from None
                if e.connection:
                    raise UserError(f"{e}; {e.hint}") from None
                if e.status != 400:
                    raise

    def publish(self, model, version: int) -> str | None:
        """Put ``model`` (policy version ``version``) on every server. Returns the adapter name
        requests must use, or None (full weights: the served model's own name)."""
        if self.adapter is None:
            path = self.folder / "full"
            model.save_pretrained(path, safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
            self.load_saved(path, version)
            return None
        if version in self.loaded:
            return self.loaded[version]
        for old in [v for v in self.loaded if v <= version - self.keep]:
            self.unload(old)
        slot = self.folder / f"slot-{version % self.keep}"
        # the LoRA weights alone: with lm_head among the targets peft would add the whole
        # embedding matrices, which training does not change
        model.save_pretrained(slot, selected_adapters=[self.adapter], safe_serialization=True,
                              save_embedding_layers=False)  # fmt: skip
        path = slot if self.adapter == "default" else slot / self.adapter  # where peft puts it
        name = f"{PREFIX}{version}"
        for c in self.clients:
            self._load(c, name, path)
        self.loaded[version] = name
        return name

    def load_saved(self, path: str | Path, version: int | str) -> None:
        """Serve the full weights of a model already saved at ``path`` (a directory the servers
        can read, or a name they can load) as policy version ``version``."""
        path = Path(path).resolve() if Path(path).exists() else path
        for c in self.clients:
            c.post("load_weights", {"path": str(path), "policy_version": str(version)})

    def unload(self, version: int) -> None:
        name = self.loaded.pop(version)
        for c in self.clients:
            try:
                c.post("unload_lora_adapter", {"lora_name": name})
            except EndpointError as e:
                if e.status != 404:  # already gone (the server restarted)
                    raise

    def reset(self) -> None:
        """Unload every version this run loaded (the policy went back to a checkpoint)."""
        for version in list(self.loaded):
            self.unload(version)

    def _load(self, client: OpenAIClient, name: str, path: Path) -> None:
        body = {"lora_name": name, "lora_path": str(path)}
        try:
            client.post("load_lora_adapter", body)
        except EndpointError as e:
            if e.status != 400 or "already" not in e.detail:
                raise
            client.post("unload_lora_adapter", {"lora_name": name})
            client.post("load_lora_adapter", body)
