"""``alignforge serve`` in a subprocess, as a rollout engine is meant to reach it: over HTTP, in
another process (so a test can kill it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    def __init__(self, model_dir: str, log: Path, port: int | None = None, name: str = "tiny"):
        from alignforge.rollout.server import free_port

        self.model_dir, self.log, self.name = model_dir, log, name
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 180.0) -> ServeProcess:
        cmd = [sys.executable, "-m", "alignforge.cli", "serve", self.model_dir, "--port",
               str(self.port), "--model-name", self.name, "--batch-size", "16"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alignforge serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(
            f"alignforge serve did not start in {timeout}s: {self.log.read_text()[-2000:]}"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def adapters(self) -> list[str]:
        cards = httpx.get(f"{self.base_url}/models", timeout=10).json()["data"]
        return [c["id"] for c in cards if c.get("parent")]
