"""A minimal client of a vLLM OpenAI-compatible server: health, runtime LoRA loading, completions.

Standard library only (urllib, json): the trainer's environment gains no dependency. Token ids in,
token ids out: prompts are sent as token ids and the reply's `token_ids` (`return_token_ids`) are
the sampled tokens, never text to re-tokenise, with vLLM's log-prob of each (`logprobs: 0`).
Every failure (nothing listening, a wrong URL, an HTTP error, a reply without those fields, a
timeout) is one `EngineError` naming the URL and what went wrong: never a hang, never a traceback.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass

from detox_lightning.errors import one_line
from detox_lightning.models.engines import EngineError


@dataclass
class Completion:
    """One sampled response: its token ids and the sampler's log-prob of each (NaN where none)."""

    token_ids: list[int]
    logprobs: list[float]


class VLLMClient:
    """HTTP calls to one server.

    Args:
        url: the server's base URL, e.g. `http://127.0.0.1:8000`.
        timeout_s: the longest wait for any one reply (`model.rollout.timeout_s`).
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def _call(self, path: str, body: dict | None = None) -> bytes:
        """GET (no body) or POST JSON to `path`; the reply's bytes, or one EngineError."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        where = f"the vLLM server at {self.url}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return reply.read()
        except urllib.error.HTTPError as err:
            detail = one_line(Exception(err.read().decode(errors="replace")), 200)
            raise EngineError(f"{where} answered {path} with HTTP {err.code} ({detail}); check model.rollout.vllm_url and the server's log") from err
        except TimeoutError as err:
            raise EngineError(f"{where} did not answer {path} within model.rollout.timeout_s={self.timeout_s:g} s") from err
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise EngineError(f"{where} did not answer {path} within model.rollout.timeout_s={self.timeout_s:g} s") from err
            raise EngineError(f"no vLLM server answers at {self.url} ({one_line(err.reason if isinstance(err.reason, BaseException) else Exception(str(err.reason)))}); check model.rollout.vllm_url") from err
        except (ConnectionError, OSError, ValueError) as err:  # reset mid-reply, an unparsable URL
            raise EngineError(f"{where} failed on {path} ({type(err).__name__}: {one_line(err)})") from err

    def _json(self, path: str, body: dict | None = None) -> dict:
        raw = self._call(path, body)
        try:
            reply = json.loads(raw)
        except ValueError as err:
            raise self.malformed(path, f"not JSON: {raw[:80]!r}") from err
        if not isinstance(reply, dict):
            raise self.malformed(path, f"expected a JSON object, got {type(reply).__name__}")
        return reply

    def malformed(self, path: str, what: str) -> EngineError:
        return EngineError(f"malformed reply from the vLLM server at {self.url}{path}: {what}")

    def healthy(self) -> bool:
        """Whether `/health` answers 200 now (any failure: False)."""
        try:
            self._call("/health")
        except EngineError:
            return False
        return True

    def load_adapter(self, name: str, path: str) -> None:
        """Register the PEFT adapter at `path` (a directory the server can read) as model `name`."""
        try:
            self._call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        except EngineError as err:
            if "has already been loaded" not in str(err):  # the same name is the same weights (a content digest)
                raise

    def unload_adapter(self, name: str) -> None:
        self._call("/v1/unload_lora_adapter", {"lora_name": name})

    def complete(
        self,
        model: str,
        prompt_ids: list[int],
        max_tokens: int,
        seed: int,
        sampling: dict,
    ) -> Completion:
        """Sample one response to `prompt_ids` (token ids) from `model` (an adapter name or the base).

        Args:
            max_tokens: the most new tokens.
            seed: this request's seed (vLLM seeds a request, not a prompt: one request per row).
            sampling: vLLM sampling fields: temperature, top_k, top_p, min_tokens, stop_token_ids.
        """
        path = "/v1/completions"
        body = {
            "model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "seed": seed, "n": 1,
            "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False, **sampling,
        }  # fmt: skip
        reply = self._json(path, body)
        choices = reply.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise self.malformed(path, f"expected one choice, got {one_line(Exception(str(choices)), 120)}")
        choice = choices[0]
        ids, logprobs = choice.get("token_ids"), (choice.get("logprobs") or {}).get("token_logprobs")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise self.malformed(path, "no list of sampled token ids ('token_ids': does the server know 'return_token_ids'?)")
        if not 1 <= len(ids) <= max_tokens:
            raise self.malformed(path, f"{len(ids)} sampled tokens, expected 1 to max_tokens={max_tokens}")
        if not isinstance(logprobs, list) or len(logprobs) != len(ids):
            raise self.malformed(path, f"expected {len(ids)} log-probs in 'logprobs.token_logprobs', got {one_line(Exception(str(logprobs)), 80)}")
        values = [math.nan if value is None else value for value in logprobs]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise self.malformed(path, "a log-prob that is not a number")
        return Completion(ids, [float(v) for v in values])
