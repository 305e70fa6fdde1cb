"""Attention backends: refuse the ones this machine cannot run, and give each the mask it reads.

    check_attn_implementation("flash_attention_2")      # ConfigError without flash-attn and a GPU
    inputs = attention_inputs(model, input_ids, position_ids=pos)   # packed rows, any backend
    hidden = decoder(input_ids=inputs.input_ids, **inputs.kwargs)
    rows, preds = inputs.locate(rows, preds)

Batches reach a model in one of three layouts:

* padded: a ``(B, T)`` 0/1 ``attention_mask``. Every backend reads it; it passes unchanged.
* packed: several examples end to end in a row, no ``attention_mask``, ``position_ids``
  restarting at 0 for each example (a new example starts wherever a position is not its
  predecessor's plus one; row-end padding at position 0 is a one-token example of its own).
* custom: a boolean ``(B, 1, T, T)`` mask, True where a query may attend to a key (DPO's
  shared-prompt layout, where rejected tokens see the prompt but not the chosen answer).

The backends read masks differently, and a mask one misreads is wrong without an error:

* ``sdpa`` takes a boolean mask (True: attend).
* ``eager`` *adds* the mask to the attention scores, so a boolean mask would add 1 and 0. It gets
  a float mask, 0 where allowed and the dtype's most negative value elsewhere.
* ``flex_attention`` adds a tensor mask inside a compiled kernel (which crashes on CPU); it gets a
  ``BlockMask`` built from the example boundaries or the boolean mask.
* ``flash_attention_2/3`` take no 4-D mask at all. A packed batch is laid end to end into one
  row and the examples' boundaries go in as ``cu_seq_lens`` (and ``position_ids``), which the
  varlen kernels read: no ``T x T`` mask is ever built. A custom layout cannot be expressed and
  is refused.

Packed rows get their mask built here rather than left to the model: transformers isolates
packed examples by ``position_ids`` only with the KV cache off and only in architectures that
hand ``position_ids`` to their mask builder, and an explicit 4-D mask is honoured by all.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignforge.config.base import ConfigError
from alignforge.config.stages import AttnImplementation

ATTN_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(AttnImplementation)
_FLASH_INSTALL = {
    "flash_attention_2": "flash-attn (pip install flash-attn --no-build-isolation)",
    "flash_attention_3": "flash-attn 3 (the `hopper` build of flash-attention)",
}


def check_attn_implementation(name: str) -> None:
    """Refuse an attention backend this machine cannot run, naming what is missing."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(
            f"attn_implementation: {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if name in _FLASH_INSTALL:
        from transformers.utils import import_utils as iu

        available = getattr(iu, f"is_flash_attn_{name[-1]}_available", lambda: False)()
        kernels = getattr(iu, "is_kernels_available", lambda: False)
        via_kernels = torch.cuda.is_available() and kernels()  # transformers' hub-kernel fallback
        if not (available or via_kernels):
            gpu = "a CUDA GPU" if torch.cuda.is_available() else "no CUDA GPU"
            raise ConfigError(
                f"attn_implementation: {name} needs a CUDA GPU and {_FLASH_INSTALL[name]} or the "
                f"`kernels` package; this machine has {gpu} and neither. Use sdpa (the default) or eager"
            )
    if name == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            "attn_implementation: flex_attention needs a GPU here (torch's FlexAttention has no "
            "backward pass on CPU); use sdpa (the default) or eager"
        )


def _config(model):
    """The model's config, through DDP-style wrappers (``.module``)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def backend(model) -> str:
    """``sdpa``, ``eager``, ``flex`` or ``flash`` (any flash-attention kernel), else the raw name."""
    impl = str(getattr(_config(model), "_attn_implementation", None) or "eager")
    if "flash" in impl:
        return "flash"
    if impl == "flex_attention":
        return "flex"
    return impl


@dataclass
class AttentionInputs:
    """What to call the model with: ``input_ids`` and ``kwargs`` (masks, positions)."""

    input_ids: Tensor
    kwargs: dict = field(default_factory=dict)
    row_width: int | None = None  # set when the rows were laid end to end into one

    def locate(self, rows: Tensor, preds: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``(row, position)`` of the caller's batch to the one the model runs on."""
        if self.row_width is None:
            return rows, preds
        return torch.zeros_like(rows), rows * self.row_width + preds


def segment_ids(position_ids: Tensor) -> Tensor:
    """``(B, T)`` example index within each row: a new one wherever a position does not follow on."""
    first = position_ids[:, :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def attention_inputs(
    model, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids=None, **extra
) -> AttentionInputs:
    """The inputs ``model``'s attention backend reads correctly for this batch layout."""
    kind = backend(model)
    kw = dict(extra)
    if attention_mask is not None and attention_mask.dim() == 4:
        kw["attention_mask"] = _custom_mask(model, kind, attention_mask)
        if position_ids is not None:
            kw["position_ids"] = position_ids
        return AttentionInputs(input_ids, kw)
    if attention_mask is not None or position_ids is None:  # padded, or one plain sequence
        for key, value in (("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None:
                kw[key] = value
        return AttentionInputs(input_ids, kw)
    seg = segment_ids(position_ids)
    kw["position_ids"] = position_ids
    if bool((seg[:, -1] == 0).all()):  # one example per row: plain causal attention
        return AttentionInputs(input_ids, kw)
    if kind == "flash":
        return _flattened(input_ids, position_ids, seg, kw)
    _check_window(model, input_ids.shape[1])
    if kind == "flex":
        kw["attention_mask"] = _flex_mask(lambda b, q, k: seg[b, q] == seg[b, k], seg)
    else:
        causal = torch.tril(
            torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device)
        )
        same = (seg[:, :, None] == seg[:, None, :]) & causal
        kw["attention_mask"] = _backend_mask(model, kind, same[:, None])
    return AttentionInputs(input_ids, kw)


def _custom_mask(model, kind: str, mask: Tensor):
    if mask.dtype != torch.bool:
        return mask  # already a float mask: the caller chose its form
    if kind == "flash":
        raise ConfigError(
            "attn_implementation: flash attention takes no custom attention mask, and this batch "
            "layout needs one (share_prompt: true); use sdpa, eager or flex_attention, or share_prompt: false"
        )
    _check_window(model, mask.shape[-1])
    if kind == "flex":
        return _flex_mask(lambda b, q, k: mask[b, 0, q, k], mask[:, 0, 0])
    return _backend_mask(model, kind, mask)


def _backend_mask(model, kind: str, allowed: Tensor) -> Tensor:
    """A boolean ``(B, 1, T, T)`` mask as ``kind`` reads it."""
    if kind == "sdpa":
        return allowed
    if kind == "eager":
        dtype = _float_dtype(model)
        out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return out.masked_fill_(~allowed, torch.finfo(dtype).min)
    raise ConfigError(
        f"attn_implementation: the model runs attention as {kind!r}, for which packed or "
        "shared-prompt batches have no known mask; use sdpa, eager, flex_attention or flash_attention_2"
    )


def _flex_mask(allowed, like: Tensor):
    """A flex-attention ``BlockMask``: causal, and ``allowed(batch, query, key)``."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        return (k <= q) & allowed(b, q, k)

    B, T = like.shape
    return create_block_mask(mask_mod, B, None, T, T, device=like.device)


def _flattened(input_ids: Tensor, position_ids: Tensor, seg: Tensor, kw: dict) -> AttentionInputs:
    """Rows laid end to end into one, with the examples' boundaries for varlen flash kernels."""
    B, T = input_ids.shape
    starts = torch.ones_like(seg, dtype=torch.bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = starts.reshape(-1).nonzero().reshape(-1)
    total = torch.tensor([B * T], device=starts.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    kw.update(
        position_ids=position_ids.reshape(1, -1),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=longest,
        max_length_k=longest,
    )
    return AttentionInputs(input_ids.reshape(1, -1), kw, row_width=T)


def _float_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _check_window(model, length: int) -> None:
    """An explicit 4-D mask replaces a sliding-window model's window: refuse rows longer than it."""
    cfg = _config(model)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    if window and length > window:
        raise ConfigError(
            f"max_length: packed rows of {length} tokens are longer than the model's sliding "
            f"window ({window}), which a packed attention mask does not apply; use shorter rows, "
            "padded batches (padding_free: false), or attn_implementation: flash_attention_2"
        )
