"""Rollout throughput of the two engines on the same model and prompts: the policy's `generate`
against a vLLM server fed its LoRA adapter (`model.rollout.engine`).

    python -m detox_lightning.bench.vllm_rollouts --shape small --prompts 16 --new-tokens 64

Both engines sample exactly `--new-tokens` tokens a prompt (EOS banned until then, so both do the
same work), from the same LoRA policy (rank 8) in float32; the first call of each is a warm-up
(vLLM's first call compiles and loads the adapter), then `--repeats` calls are timed. vLLM's time
includes the HTTP round trips and the per-row requests; the server start is reported apart. The
server runs from `$DETOX_LIGHTNING_VLLM_PYTHON` or the checkout's `.venv-vllm`. Figures go to
detox_lightning/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from detox_lightning.bench.models import _corpus, build_causal_policy, collate, make_prompts
from detox_lightning.models.architectures import architecture_of
from detox_lightning.models.engines import GenerateEngine
from detox_lightning.models.policy import PolicyConfig, build_policy
from detox_lightning.models.vllm_engine import VLLMEngine
from detox_lightning.models.vllm_server import VLLMServer, default_vllm_python


def timed(engine, policy, arch, batch, kwargs, repeats: int) -> list[float]:
    engine.sample(policy, arch, batch["input_ids"], batch["attention_mask"], kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        samples = engine.sample(policy, arch, batch["input_ids"], batch["attention_mask"], kwargs)
        times.append(time.perf_counter() - start)
        assert int(samples.mask.sum()) == batch["input_ids"].shape[0] * kwargs["max_new_tokens"]
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", help="bench.models.CAUSAL_SHAPES (head size 64: small, base)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--python", default=default_vllm_python(), help="the vLLM server environment's interpreter")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_causal_policy(Path(tmp) / "policy", args.shape, _corpus(1000))
        policy, tokenizer = build_policy(PolicyConfig(model_name_or_path=model_dir, lora_r=8, lora_alpha=16), value_head=False)
        policy.eval()
        arch = architecture_of(policy.pretrained_model.config)
        batch = collate(tokenizer, make_prompts(tokenizer, args.prompts, seed=0))
        n = args.new_tokens
        kwargs = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": n,
                  "max_new_tokens": n, "eos_token_id": [tokenizer.eos_token_id], "pad_token_id": tokenizer.eos_token_id}
        result = {"shape": args.shape, "prompts": args.prompts, "new_tokens": n,
                  "prompt_tokens_mean": float(batch["attention_mask"].sum(dim=1).float().mean()),
                  "threads": torch.get_num_threads()}
        generate = timed(GenerateEngine(), policy, arch, batch, kwargs, args.repeats)
        server = VLLMServer(args.python, model_dir, 8, "float32", Path(tmp) / "vllm.log")
        start = time.perf_counter()
        url = server.start()
        result["vllm_start_s"] = time.perf_counter() - start
        try:
            engine = VLLMEngine(url, args.python, model_dir, lora_rank=8)
            engine.workdir = Path(tmp)
            start = time.perf_counter()
            engine.sample(policy, arch, batch["input_ids"], batch["attention_mask"], kwargs)
            result["vllm_first_call_s"] = time.perf_counter() - start
            vllm = timed(engine, policy, arch, batch, kwargs, args.repeats)
        finally:
            server.stop()
    tokens = args.prompts * n
    for name, times in (("generate", generate), ("vllm", vllm)):
        result[f"{name}_s"] = sorted(times)[len(times) // 2]  # the median
        result[f"{name}_tokens_per_s"] = tokens / result[f"{name}_s"]
    result["speedup"] = result["generate_s"] / result["vllm_s"]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
