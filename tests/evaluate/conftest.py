"""Tiny random models on disk and a real streaming OpenAI-compatible server on 127.0.0.1."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SMOL = Path("/tmp/smol")


def _tiny_tokenizer(path: Path):
    """A word-level tokenizer with a chat template, for machines without /tmp/smol."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "user", "assistant", "system", ":", "{", "}", '"']
    words += [chr(c) for c in range(97, 123)] + [str(i) for i in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_model")
    tok = AutoTokenizer.from_pretrained(SMOL) if SMOL.exists() else _tiny_tokenizer(path)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny_adapter")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(
        model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(path)
    return path


class FakeServer:
    """Streams canned answers as SSE; the first request gets a 503 to exercise retries."""

    def __init__(
        self, answers: dict[str, str], default: str = "Sorry, I cannot do that.",
        reject_stream_options: bool = False,
    ):  # fmt: skip
        self.answers, self.default = answers, default
        self.reject_stream_options = reject_stream_options
        self.requests = 0
        self.payloads: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                server.payloads.append(body)
                if self.path != "/v1/chat/completions":
                    self.send_response(404)
                    self.end_headers()
                    return
                if server.requests == 1:
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"warming up")
                    return
                if server.reject_stream_options and "stream_options" in body:
                    self.send_response(400)
                    self.end_headers()
                    self.wfile.write(b"unknown field: stream_options")
                    return
                user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
                text = server.answers.get(user, server.default)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                time.sleep(0.02)  # the time to first token the client must measure
                pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
                for p in pieces:
                    chunk = {"choices": [{"index": 0, "delta": {"content": p}}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                usage = {"choices": [], "usage": {"completion_tokens": len(pieces)}}
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_server():
    """``fake_server(answers)`` -> a context manager running a FakeServer."""
    return FakeServer
