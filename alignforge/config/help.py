"""What ``alignforge train --help`` prints: the stages, or one stage's keys with their type,
default and meaning (each field's description, written once in the config classes).

    print(keys_help(DPOConfig, "dpo"))
"""

from __future__ import annotations

import re
import shutil
import textwrap
import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _title(cls: type) -> str:
    """A group's title: the first sentence of its class's docstring."""
    doc = (cls.__doc__ or "").strip()
    if not doc or cls.__module__ == "pydantic.main":
        return cls.__name__
    first = " ".join(doc.split("\n\n")[0].split()).replace("``", "`")
    return re.split(r"\.\s+(?=[A-Z])", first)[0].rstrip(".")


def keys_help(cls: type[BaseModel], stage: str, width: int | None = None) -> str:
    """Every key of ``cls`` grouped by the class that declares it, the stage's own first."""
    width = width or min(shutil.get_terminal_size((100, 24)).columns, 100)
    lines = [
        f"Keys of stage {stage} ({cls.__name__}): {_title(cls)}.",
        "Set them in the YAML config or as key=value after it (docs/guide.md). A relative path a",
        "run reads is read against the config's folder when it exists there, else the working",
        "directory; output_dir and key=value overrides against the working directory.",
    ]
    shown: set[str] = set()
    for owner in cls.__mro__:
        own = [
            n
            for n in getattr(owner, "__annotations__", {})
            if n in cls.model_fields and n not in shown
        ]
        if not own:
            continue
        lines += ["", _title(owner) if owner is not cls else f"Stage {stage}"]
        for name in own:
            field = cls.model_fields[name]
            shown.add(name)
            lines.append(f"  {name}: {_type_name(field.annotation)} = {_default(field)}")
            if field.description:
                lines += textwrap.wrap(
                    field.description, width, initial_indent=" " * 6, subsequent_indent=" " * 6
                )
    return "\n".join(lines)


def stages_help(configs: dict[str, type[BaseModel]]) -> str:
    """One line per stage, and how to list a stage's keys."""
    lines = ["Stages (a config's `stage:` picks one):"]
    lines += [f"  {stage:<5} {_title(cls)}" for stage, cls in configs.items()]
    lines += [
        "",
        "A stage's keys with their type, default and meaning:",
        "  alignforge train --help stage=dpo",
        "  alignforge train examples/dpo.yaml --help",
    ]
    return "\n".join(lines)
