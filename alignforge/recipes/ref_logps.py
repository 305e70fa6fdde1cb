"""Reference log-probs of preference pairs: scored live, or computed once and cached on disk.

    logps, n_tokens = pair_logps(model, batch)              # (2P,): chosen, then rejected
    ref = reference_logps(model, ref_model, batch)           # the same, under the reference
    source = attach_ref_logps(pairs, ref_cache_path(...), lambda: compute_ref_logps(...))

The reference is a frozen copy (full fine-tuning) or, with LoRA, the policy with its adapter
switched off. The cache file is keyed by everything that sets the values (reference weights,
tokenized pairs, ``max_length``, chat template, precision) and stores the pair keys beside the
values, so a foreign or damaged file is recomputed, never trusted. Used by DPO (every
``loss_type`` with a reference) and SPIN (the opponent is the reference).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import torch

from alignforge.data.preference import PreferencePair, pairs_hash
from alignforge.models import disabled_adapter, fingerprint, resolve_model_path
from alignforge.models.scoring import target_token_logps
from alignforge.training import to_device


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every response in ``batch`` (from :func:`collate_pairs`) in one forward.

    Returns ``(logps (2P,), n_tokens (2P,))``; entry ``i`` is pair i's chosen response, ``P + i``
    its rejected one. Token ``tgt_id`` is scored with the logits at ``tgt_pred``, the position
    before it (the causal shift), so logits are never compared with their own input token.

    Only the positions that predict a response token go through the LM head
    (:func:`alignforge.models.scoring.target_token_logps`), so no ``(B, T, V)`` logits tensor is
    ever held.
    """
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    token_logps = target_token_logps(
        model, batch["input_ids"], batch["tgt_row"], batch["tgt_pred"], batch["tgt_id"], **kwargs
    )
    n_seq = 2 * batch["n_pairs"]
    logps = torch.zeros(n_seq, dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, batch["tgt_seq"], token_logps)
    return logps, batch["resp_len"].to(logps.device)


@torch.no_grad()
def reference_logps(model, ref_model, batch: dict) -> torch.Tensor:
    """``(2P,)`` reference log-probs of ``batch``: its pre-computed ``ref_logps`` when it has
    them, else ``ref_model`` (full fine-tuning), else ``model`` with its adapter disabled, in
    eval mode (the reference sees no dropout) and left in the mode it was in."""
    if "ref_logps" in batch:
        return batch["ref_logps"].to(batch["input_ids"].device)
    if ref_model is not None:
        return pair_logps(ref_model, batch)[0]
    inner = getattr(model, "module", model)  # DDP wrapper: the adapter switch lives inside
    was_training = inner.training
    inner.eval()
    with disabled_adapter(inner):
        ref = pair_logps(inner, batch)[0]
    inner.train(was_training)
    return ref


def model_identity(name: str, cache: str | None = None) -> str:
    """Fingerprint of the reference weights (the adapter's too when one is merged in)."""
    from alignforge.models import is_adapter_dir
    from alignforge.models.loading import adapter_base

    path = resolve_model_path(name, cache)
    ident = fingerprint(path)
    if is_adapter_dir(path):
        ident += fingerprint(resolve_model_path(adapter_base(path), cache))
    return ident


@torch.no_grad()
def compute_ref_logps(
    model, ref_model, pairs: list[PreferencePair], collate, batch_size: int, device, acc=None
) -> torch.Tensor:
    """Reference log-probs ``(N, 2)`` (chosen, rejected) of every pair, in eval mode.

    With ``acc`` (several processes) batch ``j`` is scored by rank ``j % world`` under the run's
    autocast, and one all-reduce sum fills in the other ranks' rows (exact: they are 0 here), so
    every rank returns the same full tensor, built from the same batches as one process would.
    """
    from tqdm.auto import tqdm

    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    device = acc.device if acc is not None else device
    out = torch.zeros(len(pairs), 2)
    starts = list(range(0, len(pairs), batch_size))[rank::world]
    for j in tqdm(starts, desc="reference log-probs", leave=False, disable=rank != 0):
        chunk = [
            PreferencePair(p.prompt_ids, p.chosen_ids, p.rejected_ids)
            for p in pairs[j : j + batch_size]
        ]
        with acc.autocast() if acc is not None else contextlib.nullcontext():
            batch = to_device(collate(chunk), device)
            ref = reference_logps(model, ref_model, batch).float().cpu()
        P = len(chunk)
        out[j : j + P] = torch.stack([ref[:P], ref[P:]], dim=1)
    if world > 1:
        out = acc.reduce(out.to(acc.device), reduction="sum").cpu()
    return out


def precision_tag(dtype: str, finetuning_type: str, mixed_precision: str | None) -> str:
    """What besides the weights sets the reference's numbers: weight dtype, 4-bit quantisation
    (QLoRA), autocast. A bf16 or QLoRA run never reuses an fp32 run's cache."""
    weights = "nf4" if finetuning_type == "qlora" else "dense"
    return f"dtype={dtype};weights={weights};autocast={mixed_precision or 'no'}"


def ref_cache_path(
    root: str | Path, model_id: str, pairs, max_length: int, template: str, precision: str
) -> Path:
    """``root/ref_logps/<key>.pt``, keyed by everything that changes the values: the reference
    weights, the tokenized pairs, ``max_length``, the chat template and :func:`precision_tag`."""
    parts = [model_id, pairs_hash(pairs), str(max_length), template or "", precision]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    return Path(root) / "ref_logps" / f"{key}.pt"


def read_ref_cache(cache_file: Path, keys: list[str]) -> torch.Tensor | None:
    """The cached ``(N, 2)`` values when ``cache_file`` holds exactly ``keys``; None when it is
    missing, unreadable or for other pairs (then the values are recomputed)."""
    try:
        blob = torch.load(cache_file, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged file is a miss, never a crash
        return None
    if not isinstance(blob, dict) or blob.get("keys") != keys:
        return None
    values = blob.get("values")
    ok = torch.is_tensor(values) and tuple(values.shape) == (len(keys), 2)
    return values if ok else None


def write_ref_cache(cache_file: Path, keys: list[str], values: torch.Tensor) -> None:
    """Write atomically: a private temporary file in the same directory, then ``os.replace``.

    Any number of concurrent writers (processes, runs sharing a cache) leave one complete file;
    readers see the old file or the new one, never a partial one.
    """
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"keys": keys, "values": values}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def attach_ref_logps(pairs, cache_file: Path, compute, acc=None) -> str:
    """Set ``pair.ref`` from ``cache_file`` or from ``compute()`` (then cache it).

    Returns ``"cache"`` or ``"computed"``. The cache stores the pair keys next to the values and
    is refused if they do not match. With ``acc`` every rank takes part: the cache counts only
    if every rank can read it, ``compute()`` runs on all ranks (each scores its share), rank 0
    alone writes the file and the others wait for it.
    """
    keys = [p.key() for p in pairs]
    values = read_ref_cache(cache_file, keys)
    hit = values is not None
    if acc is not None and acc.num_processes > 1:
        flag = torch.tensor([float(hit)], device=acc.device)
        hit = int(acc.reduce(flag, reduction="sum").item()) == acc.num_processes
    source = "cache"
    if not hit:
        values, source = compute(), "computed"
        if acc is None or acc.is_main_process:
            write_ref_cache(cache_file, keys, values)
    if acc is not None:
        acc.wait_for_everyone()
    for p, (c, r) in zip(pairs, values.tolist(), strict=True):
        p.ref = (c, r)
    return source
