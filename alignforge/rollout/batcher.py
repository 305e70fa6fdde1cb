"""What ``alignforge serve`` runs its model through: a batching loop, runtime LoRA adapters and
weight reloads.

    batcher = Batcher(engine, Adapters(engine))
    future = batcher.submit(RowSpec(prompt_ids, max_new_tokens=32, temperature=0.8), adapter=None)
    rollout = future.result()          # or: await asyncio.wrap_future(future)

One worker thread owns the model. Rows (one per prompt and choice) wait in arrival order; when
the model is free the worker takes the oldest row and, in order, every waiting row for the same
adapter, up to ``engine.batch_size``, and generates them as one batch: each row keeps its own
temperature, top-p, seed, max_tokens, stop strings and schema. Rows that arrive meanwhile join
the next batch. Loading an adapter or new weights takes the same lock, so it happens between
batches.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from alignforge.rollout.protocol import ApiError


@dataclass
class _Waiting:
    spec: object  # RowSpec
    adapter: str | None
    future: Future


class Batcher:
    def __init__(self, engine, adapters: Adapters, max_rows: int | None = None):
        self.engine, self.adapters = engine, adapters
        self.max_rows = max_rows or engine.batch_size
        self.lock = threading.Lock()  # held while the model generates or changes
        self._cond = threading.Condition()
        self._waiting: list[_Waiting] = []
        threading.Thread(target=self._loop, daemon=True, name="alignforge-batcher").start()

    @property
    def queued(self) -> int:
        """Rows waiting for the model."""
        with self._cond:
            return len(self._waiting)

    def submit(self, spec, adapter: str | None = None) -> Future:
        future: Future = Future()
        with self._cond:
            self._waiting.append(_Waiting(spec, adapter, future))
            self._cond.notify()
        return future

    def _take(self) -> list[_Waiting]:
        """The oldest row and the next waiting rows for its adapter, up to ``max_rows``."""
        with self._cond:
            adapter = self._waiting[0].adapter
            batch = [w for w in self._waiting if w.adapter == adapter][: self.max_rows]
            taken = {id(w) for w in batch}
            self._waiting = [w for w in self._waiting if id(w) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
            # Take the rows only once the model is free: what arrived meanwhile joins this batch.
            with self.lock:
                batch = self._take()
                adapter = batch[0].adapter
                try:
                    with self.adapters.active(adapter):
                        rollouts = self.engine.generate_rows([w.spec for w in batch])
                except Exception as e:  # every row of the batch reports it
                    for w in batch:
                        w.future.set_exception(e)
                    continue
                if adapter is not None:  # the policy that sampled: the adapter's weights
                    for r in rollouts:
                        r.policy_version = self.adapters.paths[adapter]
            for w, rollout in zip(batch, rollouts, strict=True):
                w.future.set_result(rollout)


class Adapters:
    """LoRA adapters loaded into the served model at runtime (peft), by name, as vLLM's
    ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` do.

    The first adapter wraps the model in a ``PeftModel``; the last one unloaded unwraps it, so
    the base model runs exactly as before. Requests for the base run with adapters disabled.
    """

    def __init__(self, engine):
        self.engine = engine
        self.paths: dict[str, str] = {}

    def load(self, name: str, path: str, inplace: bool = False) -> None:
        from peft import PeftModel

        from alignforge.models import is_adapter_dir

        if not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.paths and not inplace:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want "
                           "to load the adapter in place, set 'load_inplace' to True.")  # fmt: skip
        if _is_peft(self.engine.model) and not self.paths:
            raise ApiError(400, "the served model is a PEFT adapter: serve it merged "
                           "(alignforge serve merges an adapter directory) to add adapters")  # fmt: skip
        if not is_adapter_dir(path):
            raise ApiError(404, f"Loading lora {name} failed: No adapter found for {path} "
                           "(a PEFT adapter directory has adapter_config.json)", "lora_path")  # fmt: skip
        if name in self.paths:
            self._delete(name)
        try:
            if self.paths:
                self.engine.model.load_adapter(path, adapter_name=name)
            else:
                self.engine.model = PeftModel.from_pretrained(
                    self.engine.model, path, adapter_name=name
                ).eval()
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise ApiError(400, f"lora_path {path}: {e}", "lora_path") from None
        self.paths[name] = path

    def unload(self, name: str) -> None:
        if not name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.paths:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        self._delete(name)

    def _delete(self, name: str) -> None:
        del self.paths[name]
        if self.paths:  # peft makes a remaining adapter active
            self.engine.model.delete_adapter(name)
        else:
            self.engine.model = self.engine.model.unload()

    @contextlib.contextmanager
    def active(self, name: str | None):
        """Generate with adapter ``name``, or with the base model (``None``)."""
        model = self.engine.model
        if name is not None:
            if name not in self.paths:  # unloaded while the request waited
                raise ApiError(404, f"The model `{name}` does not exist.", "model")
            model.set_adapter(name)
            yield
        elif self.paths:
            with model.disable_adapter():
                yield
        else:
            yield

    def reload_base(self, path: str, policy_version: str | None = None) -> None:
        """Replace the base weights by those in ``path`` (same tokenizer), keep its device,
        precision and quantization, and load the adapters again on top."""
        import torch

        from alignforge.rollout.batch import Int8Linear
        from alignforge.rollout.server import _load_model

        old = self.engine.model
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                 torch.float16: "float16"}[next(old.parameters()).dtype]  # fmt: skip
        int8 = any(isinstance(m, Int8Linear) for m in old.modules())
        try:
            model, _ = _load_model(path, dtype, device=self.engine.device,
                                   quantization="int8" if int8 else None)  # fmt: skip
        except Exception as e:
            raise ApiError(400, f"path {path}: {e}", "path") from None
        rows = model.get_input_embeddings().weight.shape[0]
        if rows != old.get_input_embeddings().weight.shape[0]:
            raise ApiError(400, f"path {path}: its vocabulary has {rows} rows, the served "
                           "model's tokenizer another size; serve it instead", "path")  # fmt: skip
        adapters, self.paths = dict(self.paths), {}
        self.engine.model = model
        self.engine.set_policy_version(policy_version or path)
        for name, adapter_path in adapters.items():
            self.load(name, adapter_path)


def _is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
