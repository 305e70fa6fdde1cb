from alignforge.data.collate import collate_packed, collate_padded, pack
from alignforge.data.formats import ChatExample, TextExample, read_prompts, to_example, to_prompt
from alignforge.data.prepare import DataStats, prepare_sft
from alignforge.data.readers import DataError, read_rows
from alignforge.data.templating import IGNORE, Tokenized, tokenize_example

__all__ = [
    "IGNORE",
    "ChatExample",
    "DataError",
    "DataStats",
    "TextExample",
    "Tokenized",
    "collate_packed",
    "collate_padded",
    "pack",
    "prepare_sft",
    "read_prompts",
    "read_rows",
    "to_example",
    "to_prompt",
    "tokenize_example",
]
