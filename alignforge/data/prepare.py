"""Turn raw rows into tokenized training examples, counting everything that was changed or left out.

examples, stats = prepare_sft(rows, tokenizer, max_length=1024)
print(stats)   # rows, used, truncated, dropped_too_long, dropped_no_labels, bad_rows, tokens
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from alignforge.data.formats import to_example
from alignforge.data.mix import row_name
from alignforge.data.readers import DataError
from alignforge.data.templating import Tokenized, fit_length, tokenize_example


@dataclass
class DataStats:
    rows: int = 0
    used: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0
    bad_rows: int = 0
    tokens: int = 0
    label_tokens: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bad_examples"] = d["bad_examples"][:20]
        return d


def prepare_sft(
    rows: list[dict],
    tokenizer,
    max_length: int,
    truncation: str = "truncate",
    formatting: str = "auto",
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    source: str = "dataset",
) -> tuple[list[Tokenized], DataStats]:
    """Tokenize rows with loss masks; a bad row raises with its index unless ``skip_bad_rows``."""
    stats = DataStats(rows=len(rows))
    plain = getattr(tokenizer, "chat_template", None) is None
    out: list[Tokenized] = []
    for idx, row in enumerate(rows):
        try:
            tok = tokenize_example(
                tokenizer, to_example(row, formatting, columns, plain_strings=plain)
            )
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{row_name(rows, idx, source)}: {e}") from None
            stats.bad_rows += 1
            stats.bad_examples.append(f"{row_name(rows, idx, source)}: {e}")
            continue
        fitted = fit_length(tok, max_length, truncation)
        if fitted is None:
            if len(tok) > max_length and truncation == "drop":
                stats.dropped_too_long += 1
            else:
                stats.dropped_no_labels += 1
            continue
        stats.truncated += fitted.truncated
        stats.tokens += len(fitted)
        stats.label_tokens += fitted.n_label_tokens
        out.append(fitted)
    stats.used = len(out)
    if not out:
        raise DataError(f"{source}: no usable examples out of {len(rows)} rows ({stats.as_dict()})")
    return out, stats
