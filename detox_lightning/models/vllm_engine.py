"""Rollouts on a vLLM server for decoder-only policies, fed the policy's LoRA adapter.

The server holds the frozen base model; the trainer syncs only the policy adapter: before a
rollout whose adapter weights differ from the last ones the server loaded (after every update,
after a rollback, after a resume), it writes the adapter atomically (`io.atomic.write_directory`)
into a folder named by a digest of its weights and asks the server to load it under that name
(`/v1/load_lora_adapter`, vLLM's runtime LoRA loading); the requests name it. The previous one is
unloaded and deleted. Nothing else crosses: no full-weight broadcast, nothing device-specific, so
the server may sit on other devices or another machine that can read the folder.

Token ids in, token ids out: each prompt row is sent as its unpadded token ids, one request per
row with its own seed (vLLM seeds a request, and the k rows of one prompt must differ), drawn from
torch's global generator so that a seeded run (and a resumed one, whose RNG state comes back)
sends the same seeds. The reply's token ids are padded after the first end token into
`Samples`, with vLLM's log-prob of each sampled token (`Samples.sampler_logprobs`).
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import torch

from detox_lightning.io.atomic import write_directory
from detox_lightning.models.architectures import Architecture
from detox_lightning.models.engines import EngineError, RolloutEngine
from detox_lightning.models.policy import POLICY_ADAPTER
from detox_lightning.models.rollout import Samples
from detox_lightning.models.vllm_client import Completion, VLLMClient
from detox_lightning.models.vllm_server import VLLMServer
from detox_lightning.rl.masks import response_mask


def adapter_digest(peft_model) -> str:
    """A digest of the policy adapter's weights, as saved (names, dtypes and bytes)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=POLICY_ADAPTER)
    digest = hashlib.blake2b(digest_size=12)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().flatten()
        digest.update(f"{name}:{tensor.dtype}:{tensor.numel()};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vllm_sampling(generation_kwargs: dict) -> dict:
    """`generate` kwargs -> vLLM's sampling fields: the same temperature, top-k/p, minimum length and end ids."""
    top_k = int(generation_kwargs.get("top_k") or 0)
    return {
        "temperature": float(generation_kwargs.get("temperature", 1.0)),
        "top_k": top_k if top_k > 0 else -1,
        "top_p": float(generation_kwargs.get("top_p", 1.0)),
        "min_tokens": int(generation_kwargs.get("min_new_tokens", 0)),  # EOS banned before them, as generate
        "stop_token_ids": [int(i) for i in generation_kwargs["eos_token_id"]],
    }


def samples_from_completions(
    completions: list[Completion], end_ids: list[int], pad_id: int, device: torch.device
) -> Samples:
    """(B, T) response ids padded with `pad_id` after the first end id, the mask, and the sampler's log-probs."""
    length = max(len(c.token_ids) for c in completions)  # T
    ids = torch.full((len(completions), length), pad_id, dtype=torch.long)  # (B, T)
    logprobs = torch.zeros(len(completions), length)  # (B, T)
    lengths = torch.tensor([len(c.token_ids) for c in completions])  # (B,)
    for row, c in enumerate(completions):
        ids[row, : len(c.token_ids)] = torch.tensor(c.token_ids)
        logprobs[row, : len(c.token_ids)] = torch.tensor(c.logprobs)
    # From the lengths, not from the ids alone: where the pad id is an end id (no pad token: EOS
    # pads) the padding of a row cut at the cap would read as its end token.
    mask = (torch.arange(length)[None, :] < lengths[:, None]) & response_mask(ids, end_ids)  # (B, T) bool
    ids = ids.masked_fill(~mask, pad_id)  # (B, T)
    return Samples(ids.to(device), mask.to(device), sampler_logprobs=(logprobs * mask).to(device))


class VLLMEngine(RolloutEngine):
    """Samples on a vLLM server: one at `url`, or one started here from `python` on first use.

    Args:
        url: a running server's base URL; None: start one (`vllm_server.VLLMServer`).
        python: the server environment's interpreter (to start one).
        model_dir: the base model's directory or hub id, as the trainer loaded it.
        lora_rank: the policy adapter's rank (the server's `--max-lora-rank`).
        dtype: the trainer's base-weight dtype, the server's too.
        timeout_s: the longest wait for one reply; startup_timeout_s: for a started server's health.
        max_concurrency: requests in flight at once (the server batches them).
    """

    name: ClassVar[str] = "vllm"

    def __init__(
        self,
        url: str | None,
        python: str,
        model_dir: str,
        lora_rank: int,
        dtype: str = "float32",
        timeout_s: float = 300.0,
        startup_timeout_s: float = 300.0,
        max_concurrency: int = 64,
    ) -> None:
        self.url, self.python, self.model_dir, self.lora_rank, self.dtype = url, python, model_dir, lora_rank, dtype
        self.timeout_s, self.startup_timeout_s, self.max_concurrency = timeout_s, startup_timeout_s, max_concurrency
        self.workdir: Path | None = None  # where adapters (and a started server's log) go: set before sampling
        self.server: VLLMServer | None = None
        self.client: VLLMClient | None = None
        self.instance = uuid.uuid4().hex[:8]  # os.urandom, not torch's RNG: seeded sampling is not disturbed
        self.loaded: tuple[str, Path] | None = None  # the adapter the server has now: name, folder
        self.syncs = 0  # adapters loaded so far

    def folder(self) -> Path:
        if self.workdir is None:
            raise ValueError("VLLMEngine.workdir is not set: the folder for the synced adapters (the module sets it)")
        return self.workdir

    def connect(self) -> VLLMClient:
        """The client; starts a server first where no URL was given."""
        if self.client is None:
            url = self.url
            if url is None:
                self.server = VLLMServer(
                    self.python, self.model_dir, self.lora_rank, self.dtype,
                    self.folder() / "vllm_server.log", self.startup_timeout_s,
                )  # fmt: skip
                url = self.server.start()
                atexit.register(self.close)
            self.client = VLLMClient(url, self.timeout_s)
        return self.client

    def sync(self, peft_model) -> str:
        """The name under which the server has the policy adapter's current weights (loading them if new)."""
        client = self.connect()
        name = f"detox-{self.instance}-{adapter_digest(peft_model)}"
        if self.loaded is not None and self.loaded[0] == name:
            return name

        def fill(staging: Path) -> Path:
            peft_model.save_pretrained(staging, selected_adapters=[POLICY_ADAPTER], safe_serialization=True)
            return staging / POLICY_ADAPTER  # peft saves a non-default adapter in a sub-folder

        path = (self.folder() / "adapters" / name).resolve()
        write_directory(path, fill)
        client.load_adapter(name, str(path))
        previous, self.loaded = self.loaded, (name, path)
        self.syncs += 1
        if previous is not None:
            client.unload_adapter(previous[0])
            shutil.rmtree(previous[1], ignore_errors=True)
        return name

    def sample(
        self,
        policy,
        arch: Architecture,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        generation_kwargs: dict,
        keep_logits: bool = False,
    ) -> Samples:
        if keep_logits:
            raise ValueError("vLLM's samples carry no trainer logits: score them with a forward pass")
        if not arch.vllm_serves:
            raise EngineError("vLLM serves decoder-only models only: model.rollout.engine must be generate for T5")
        name = self.sync(policy.pretrained_model)
        rows = attention_mask.shape[0]
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
        seeds = torch.randint(0, 2**31 - 1, (rows,)).tolist()  # (B,) one seed a request, from the seeded RNG
        sampling = vllm_sampling(generation_kwargs)
        max_tokens = int(generation_kwargs["max_new_tokens"])
        with ThreadPoolExecutor(max_workers=max(1, min(rows, self.max_concurrency))) as pool:
            completions = list(
                pool.map(lambda row: self.client.complete(name, prompts[row], max_tokens, seeds[row], sampling), range(rows))
            )
        return samples_from_completions(
            completions, sampling["stop_token_ids"], int(generation_kwargs["pad_token_id"]), input_ids.device
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server, self.client, self.loaded = None, None, None
