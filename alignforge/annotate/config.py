"""Annotation project settings: the aspect questions, the answer scale, overlap and limits.

    from alignforge.annotate.config import AnnotateConfig, load_project_config
    cfg = load_project_config("ann/")            # reads ann/annotate.yaml
    cfg.aspects[0].question                       # 'Which has more complete and accurate entities?'

A project's ``annotate.yaml`` is written by ``alignforge annotate init`` with every default made
explicit; edit it (or pass ``--config aspects.yaml`` to ``init``) to change the questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, field_validator, model_validator

from alignforge.config import StrictModel, load_config

CONFIG_NAME = "annotate.yaml"


class Aspect(StrictModel):
    """One question the annotator answers for every pair."""

    key: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="short id used in exports")
    question: str = Field(min_length=3, max_length=300)
    help: str = Field("", max_length=2000, description="shown under the question")


DEFAULT_ASPECTS = [
    Aspect(
        key="entities",
        question="Which has more complete and accurate entities?",
        help="Significant entities present, none invented, types and descriptions right.",
    ),
    Aspect(
        key="relations",
        question="Which infers the key relationships better?",
        help="Explicit and implied relationships between the entities, correctly typed.",
    ),
    Aspect(
        key="summary",
        question="Which has more concise, accurate summaries?",
        help="Short, faithful to the document, nothing missing that matters.",
    ),
]


class Shortcuts(StrictModel):
    """Keys of the task page's actions, as ``KeyboardEvent.key`` names ("Enter", "ArrowDown",
    "u" ...). The answer keys come from the scale (1-3 or 1-5)."""

    save: str = Field("Enter", min_length=1, max_length=20)
    skip: str = Field("Backspace", min_length=1, max_length=20, description="asks to confirm")
    undo_skip: str = Field("u", min_length=1, max_length=20)
    next_question: str = Field("j", min_length=1, max_length=20)
    prev_question: str = Field("k", min_length=1, max_length=20)
    scroll_down: str = Field("ArrowDown", min_length=1, max_length=20, description="both answers")
    scroll_up: str = Field("ArrowUp", min_length=1, max_length=20)
    page_down: str = Field("PageDown", min_length=1, max_length=20)
    page_up: str = Field("PageUp", min_length=1, max_length=20)
    raw: str = Field("r", min_length=1, max_length=20, description="raw answers on / off")
    guidelines: str = Field("g", min_length=1, max_length=20)
    comment: str = Field("c", min_length=1, max_length=20)
    revise_previous: str = Field("p", min_length=1, max_length=20, description="last judged item")


class Choice(NamedTuple):
    key: str  # keyboard key shown on screen
    label: str
    score: int  # from the left-hand (displayed A) side's point of view: + means A is better


SCALES: dict[str, list[Choice]] = {
    "ab": [Choice("1", "A", 1), Choice("2", "Tie", 0), Choice("3", "B", -1)],
    "likert5": [
        Choice("1", "A much better", 2),
        Choice("2", "A better", 1),
        Choice("3", "Tie", 0),
        Choice("4", "B better", -1),
        Choice("5", "B much better", -2),
    ],
}


REFERENCE_MEASURES = ("entity_f1", "relation_f1", "f1", "lenient_f1", "format")


class Noise(StrictModel):
    """How a simulated annotator departs from the reference judge's verdict, per aspect."""

    flip_rate: float = Field(
        0.1, ge=0.0, le=1.0, description="chance of answering the other side on a decisive aspect"
    )
    tie_rate: float = Field(
        0.05, ge=0.0, le=1.0, description="chance of a tie on a decisive aspect"
    )
    position_bias: float = Field(
        0.05, ge=0.0, le=1.0, description="chance of preferring the side shown first, any aspect"
    )
    fatigue: float = Field(
        0.0, ge=0.0, le=10.0, description="flip_rate grows by this per 100 items of a session"
    )


class MemberNoise(StrictModel):
    """One simulated annotator's own noise; an unset field takes the panel's."""

    flip_rate: float | None = Field(None, ge=0.0, le=1.0)
    tie_rate: float | None = Field(None, ge=0.0, le=1.0)
    position_bias: float | None = Field(None, ge=0.0, le=1.0)
    fatigue: float | None = Field(None, ge=0.0, le=10.0)


class PanelConfig(Noise):
    """A panel of simulated annotators (``alignforge annotate simulate``); noise as in ``Noise``."""

    annotators: int = Field(3, ge=1, le=100, description="simulated users sim-1 ... sim-k")
    members: list[MemberNoise] = Field(
        default_factory=list, description="per-annotator overrides: the first entry is sim-1's"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _members_fit(self) -> PanelConfig:
        if len(self.members) > self.annotators:
            raise ValueError(
                f"members: {len(self.members)} entries for {self.annotators} annotators"
            )
        return self

    def noise(self, k: int) -> Noise:
        """Annotator ``k``'s noise (0-based): the panel's, with ``members[k]``'s fields set."""
        own = self.members[k].model_dump(exclude_none=True) if k < len(self.members) else {}
        return Noise(**{**{f: getattr(self, f) for f in Noise.model_fields}, **own})


class AnnotateConfig(StrictModel):
    """Every field of an annotation project (``annotate.yaml``)."""

    title: str = Field("Which extraction is better?", max_length=200)
    instructions: str = Field(
        "Read the document, then compare the two extractions aspect by aspect. Answer with the "
        "number keys; Enter saves, Backspace twice skips.",
        max_length=20000,
    )
    aspects: list[Aspect] = Field(default_factory=lambda: list(DEFAULT_ASPECTS), min_length=1)
    shortcuts: Shortcuts = Field(default_factory=Shortcuts)
    scale: Literal["ab", "likert5"] = Field("ab", description="A/tie/B or a 5-point scale")
    expect_json: bool = Field(
        True, description="completions should be JSON: flag those with no JSON at all"
    )
    overlap: float = Field(0.2, ge=0.0, le=1.0, description="share of a batch every member sees")
    alert_margin: float = Field(
        0.1, ge=0.0, le=2.0, description="alert when alpha < trial baseline - margin"
    )
    alpha_floor: float = Field(
        0.4, ge=-1.0, le=1.0, description="alert when a window's alpha is below this, trial or not"
    )
    min_agreement_items: int = Field(
        20, ge=2, description="shared items a window needs before it can raise an alert"
    )
    bootstrap_samples: int = Field(
        1000, ge=0, le=100_000, description="resamples for alpha's 95% interval (0: none)"
    )
    max_text_chars: int = Field(100_000, ge=100, description="longest prompt/completion kept")
    max_comment_chars: int = Field(2000, ge=0, le=100_000)
    max_body_bytes: int = Field(65_536, ge=1024, description="largest request body accepted")
    session_hours: float = Field(12.0, gt=0)
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses (or CIDR ranges) of reverse proxies whose X-Forwarded-Proto and "
        "X-Forwarded-For are believed; '*' trusts any. Empty: forwarded headers are ignored",
    )
    idle_cap_seconds: float = Field(
        600.0, gt=0, description="time on one item counted at most this long in rates"
    )
    reference_measures: dict[str, Literal[REFERENCE_MEASURES]] = Field(
        default_factory=lambda: {"entities": "entity_f1", "relations": "relation_f1",
                                 "summary": "format"},
        description="what the reference judge compares with the gold answer for each aspect key",
    )  # fmt: skip
    panel: PanelConfig = Field(default_factory=PanelConfig, description="simulated annotators")
    seed: int = 0

    @field_validator("aspects")
    @classmethod
    def _unique_keys(cls, v: list[Aspect]) -> list[Aspect]:
        keys = [a.key for a in v]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"aspect keys must be unique; repeated: {', '.join(dup)}")
        if len(v) > 9:
            raise ValueError("at most 9 aspects (one screen, one key each)")
        return v

    @model_validator(mode="after")
    def _keys_distinct(self) -> AnnotateConfig:
        used: dict[str, str] = {c.key: f"answer {c.label!r}" for c in SCALES[self.scale]}
        for action, key in self.shortcuts.model_dump().items():
            if key in used:
                raise ValueError(f"shortcuts.{action}: key {key!r} is already taken by {used[key]}")
            used[key] = f"shortcuts.{action}"
        return self

    @property
    def choices(self) -> list[Choice]:
        return SCALES[self.scale]

    @property
    def level(self) -> str:
        """Krippendorff's level of measurement of the aspect answers."""
        return "ordinal" if self.scale == "likert5" else "nominal"

    def alert_rules(self):
        from alignforge.annotate.dashboard import AlertRules

        return AlertRules(self.alpha_floor, self.alert_margin, self.min_agreement_items)


def load_project_config(project_dir: str | Path, overrides: list[str] | None = None):
    path = Path(project_dir) / CONFIG_NAME
    return load_config(AnnotateConfig, path if path.exists() else None, overrides)
