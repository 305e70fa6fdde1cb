"""YAML configs with ``key=value`` overrides, validated by pydantic.

    cfg = load_config(SFTConfig, "examples/sft.yaml", ["learning_rate=1e-4", "lora_rank=8"])

Overrides use dotted keys for nested mappings (``optim.betas=[0.9,0.95]``) and are parsed as
YAML scalars, so ``true``, ``3``, ``1e-4`` and ``[a, b]`` get their natural types.

A relative input path written in a config file (a field marked ``INPUT_PATH``: ``dataset``,
``model_name_or_path``, ``template``...) is read against the file's folder when it exists there,
else against the working directory; an override is always read against the working directory
(docs/decisions.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from alignforge.errors import UserError

T = TypeVar("T", bound="StrictModel")


class ConfigError(UserError, ValueError):
    """A config value is missing, unknown or out of range; the message names the field."""


# Marks a field whose value is a path a run reads (``Field(..., json_schema_extra=INPUT_PATH)``).
INPUT_PATH = {"input_path": True}

# Names other tools give our keys (LLaMA-Factory, TRL, PEFT). A config using one is refused with the
# name to use rather than accepted: one name per setting, and a saved config reads like the docs.
KEY_ALIASES = {
    "cutoff_len": "max_length",
    "max_seq_length": "max_length",
    "lora_r": "lora_rank",
    "r": "lora_rank",
    "lora_target_modules": "lora_target",
    "target_modules": "lora_target",
    "lr": "learning_rate",
    "epochs": "num_train_epochs",
    "num_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "train_batch_size": "per_device_train_batch_size",
    "eval_batch_size": "per_device_eval_batch_size",
    "gradient_accumulation": "gradient_accumulation_steps",
    "pref_beta": "beta",
    "pref_loss": "loss_type",
    "model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "dataset_name": "dataset",
    "train_file": "dataset",
    "validation_file": "eval_dataset",
    "chat_template": "template",
    "init_kl_coef": "kl_coef",
    "vllm_server_base_url": "rollout_base_url",
}
# Keys with no counterpart here (LLaMA-Factory's, our own former names), and what to do instead.
KEY_NOTES = {
    "endpoint": "it is now base_url (a server's base URL, e.g. http://127.0.0.1:8000/v1)",
    "rollout_staleness": "it is now max_staleness (the same meaning: batches drawn k PPO steps "
    "ahead)",
    "dataset_dir": "give `dataset` as paths; a relative one is read against this config file's "
    "folder when it exists there, else the working directory",
    "do_train": "not needed: `alignforge train` trains",
    "do_eval": "not needed: eval runs when there is eval data (eval_dataset or val_size)",
}


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}``."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            value = _as_number(value)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
        node[parts[-1]] = value
    return out


def _as_number(text: str):
    """YAML 1.1 reads ``1e-4`` as a string; numbers written that way are meant as floats."""
    try:
        return float(text) if any(c in text for c in "eE.") else int(text)
    except ValueError:
        return text


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def format_validation_error(cls: type[BaseModel], err: ValidationError, source: str = "") -> str:
    """One line per problem, naming the field, the bad value and what is allowed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if not e["loc"] and e["type"] == "value_error":
            # a whole-config check: its message starts with the field it is about, and the
            # input would be the entire config
            lines.append("  " + msg.removeprefix("Value error, "))
            continue
        if e["type"] == "extra_forbidden":
            model, key = _model_at(cls, e["loc"][:-1]), str(e["loc"][-1])
            msg = _alias_hint(key, model.model_fields) or _unknown_key(model, key)
        elif "input" in e and e["type"] != "missing":
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    where = f" in {source}" if source else ""
    return f"invalid {cls.__name__}{where}:\n" + "\n".join(lines)


def _alias_hint(key: str, fields) -> str | None:
    """What to write instead of another tool's name for a key, or None."""
    if key in KEY_NOTES:
        return f"unknown key; {KEY_NOTES[key]}"
    canonical = KEY_ALIASES.get(key)
    if canonical in fields:
        return f"unknown key (did you mean {canonical}? {key} is another tool's name for it)"
    if canonical:
        return f"unknown key; {key} is another tool's name for {canonical}, which this config does not take"
    return None


def _unknown_key(model: type[BaseModel], key: str) -> str:
    """The closest valid keys and where to see them all; a training stage's list is long, so
    it is left to ``alignforge train --help``."""
    close = _close_matches(key, list(model.model_fields))
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    stage = model.model_fields.get("stage")
    if stage is not None and isinstance(stage.default, str):
        return f"unknown key{hint}; `alignforge train --help stage={stage.default}` lists every key"
    return f"unknown key{hint}; allowed keys: {', '.join(sorted(model.model_fields))}"


def _model_at(cls: type[BaseModel], path) -> type[BaseModel]:
    """The config class a key at ``path`` belongs to: nested models (alone, in lists or dicts)
    are followed; list indices and dict keys stay in the model that holds them."""
    for part in path:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            cls = _model_in(field.annotation) or cls
    return cls


def _model_in(annotation) -> type[BaseModel] | None:
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _close_matches(word: str, options: list[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(word, options, n=3, cutoff=0.6)


def build_config(cls: type[T], data: dict[str, Any], source: str = "") -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(cls, e, source)) from None


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    data = resolve_paths(cls, read_yaml(path), Path(path).parent) if path else {}
    data = deep_merge(data, parse_overrides(overrides))
    return build_config(cls, data, str(path or ""))


def resolve_paths(cls: type[BaseModel], data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """``data``, read from a config file in ``folder``, with each relative input path (an
    ``INPUT_PATH`` field) that exists under ``folder`` made absolute; any other value is left as
    written, for the working directory to read. A value may name several paths, as a YAML list
    or separated by commas (``dataset: a.jsonl,b.jsonl``)."""
    out = dict(data)
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra
        if name in out and isinstance(extra, dict) and extra.get("input_path"):
            out[name] = _resolve(out[name], folder)
    return out


def _resolve(value: Any, folder: Path) -> Any:
    if isinstance(value, list):
        return [_resolve(v, folder) for v in value]
    if not isinstance(value, str) or not value:
        return value
    here = folder / Path(value).expanduser()
    if here.exists():  # an absolute value stays itself: folder / absolute == absolute
        return os.path.abspath(here)
    if "," in value:
        return ",".join(_resolve(part.strip(), folder) for part in value.split(","))
    return value


def save_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default made explicit) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(cfg.model_dump_json())
    path.write_text(yaml.safe_dump(data, sort_keys=False))
