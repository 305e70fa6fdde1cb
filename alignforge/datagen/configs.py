"""YAML configs of the ``alignforge data`` commands (every field documented once)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignforge.config import StrictModel
from alignforge.config.stages import RolloutEngineArgs


class InstructionsConfig(StrictModel):
    """``alignforge data instructions``: back-translated instruction/answer pairs."""

    input: str = Field(
        description="Documents (.jsonl with text field, .txt, or a folder) or a chunks .jsonl from `data chunk`."
    )
    output_dir: str = Field(
        description="Where cache.jsonl, sft.jsonl, rejects.jsonl and report.json go."
    )
    input_is_chunks: bool = Field(
        False, description="Treat `input` as chunks written by `data chunk`."
    )
    text_field: str = Field("text", description="Field holding the document text in .jsonl input.")
    id_field: str = Field("id", description="Field holding the document id in .jsonl input.")
    target_size: int = Field(1000, gt=0, description="Chunk target size (chars or tokens).")
    max_size: int | None = Field(
        None, gt=0, description="Hard chunk size limit (default 1.5 x target)."
    )
    # teacher: an endpoint (base_url + model) or a local model directory (model_path)
    base_url: str | None = Field(
        None, description="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1."
    )
    model: str = Field(
        "teacher", description="Model name sent to the endpoint and recorded as teacher_model."
    )
    model_path: str | None = Field(
        None, description="Local model directory used instead of an endpoint."
    )
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key (default OPENAI_API_KEY / ALIGNFORGE_API_KEY).",
    )
    max_concurrency: int = Field(8, ge=1, description="Requests in flight.")
    timeout: float = Field(60.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(4, ge=0, description="HTTP retries (429/5xx/timeouts) per request.")
    n_pairs: int = Field(3, ge=1, description="Instruction/answer pairs per chunk.")
    min_pairs: int = Field(1, ge=1, description="Fewest usable pairs for a reply to count.")
    temperature: float = Field(0.7, ge=0)
    max_tokens: int = Field(1024, ge=1)
    max_attempts: int = Field(
        3, ge=1, description="Tries per chunk before it goes to rejects.jsonl."
    )
    batch_size: int = Field(16, ge=1, description="Chunks per round of concurrent requests.")
    use_json_schema: bool = Field(
        True, description="Send a json_schema response_format / decode under the schema."
    )
    max_instruction_chars: int = Field(300, ge=1)
    max_answer_chars: int = Field(2000, ge=1)
    near_dup_threshold: float | None = Field(
        None, gt=0, le=1, description="Also drop instructions with embedding cosine >= this."
    )
    output_format: Literal["messages", "prompt_completion"] = "messages"

    @model_validator(mode="after")
    def _one_teacher(self):
        if (self.base_url is None) == (self.model_path is None):
            raise ValueError("set exactly one of base_url (endpoint) or model_path (local model)")
        return self


class PreferencesConfig(RolloutEngineArgs):
    """``alignforge data preferences``: greedy + tempered samples per prompt, drawn in process or
    (``rollout_engine: server``) by ``alignforge serve`` after it has loaded ``model``."""

    prompts: str = Field(
        description="JSONL of prompts: {prompt (text or messages), prompt_id?, doc_id?, split?}."
    )
    model: str = Field(description="Policy model directory (the checkpoint that will be trained).")
    output_dir: str = Field(description="Where samples.jsonl goes.")
    prompt_field: str = Field("prompt", description="Field of the prompt in the prompts file.")
    max_samples: int | None = Field(
        None, gt=0, description="Use only the first N prompts of the file (default: all)."
    )
    k: int = Field(4, ge=2, description="Completions per prompt: 1 greedy + k-1 samples.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of the k-1 samples.")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    seed: int = 0
    batch_size: int = Field(8, ge=1, description="Generation rows per forward batch.")
    train_ratio: float = Field(0.8, ge=0)
    validation_ratio: float = Field(0.1, ge=0)
    test_ratio: float = Field(0.1, ge=0)
