"""vLLM rollouts without vLLM: the importance weights (by hand and against trl's installed code),
the losses they multiply, the reply parsing, the adapter sync, and every failure of the server
(down, wrong URL, malformed, late) as one error, against a stdlib HTTP server in a thread.
The real server: tests/test_vllm_server.py."""

import inspect
import json
import math
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from detox_lightning.models.architectures import architecture_of
from detox_lightning.models.engines import EngineError
from detox_lightning.models.policy import PolicyConfig, build_policy
from detox_lightning.models.vllm_client import Completion, VLLMClient
from detox_lightning.models.vllm_engine import VLLMEngine, adapter_digest, samples_from_completions, vllm_sampling
from detox_lightning.models.vllm_server import VLLMServer, max_lora_rank
from detox_lightning.rl import losses
from detox_lightning.rl.experience import Experience
from detox_lightning.rl.importance import importance_weights, sampler_mismatch
from detox_lightning.training.settings import GenerationSettings, RLSettings, RolloutSettings, check_settings

ROOT = Path(__file__).resolve().parents[1]


# ---- importance weights ----


def close(got, expected):
    return torch.allclose(got, torch.tensor(expected, dtype=got.dtype), atol=1e-6)


def test_importance_weights_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -0.4]])
    sampler = torch.tensor([[-1.5, -1.0, -9.0], [-0.2, -1.3, -0.4]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # log-ratios: row 0 [0.5, -1.0, (padding) 0], row 1 [0, 1.0, 0]
    e = math.exp
    got = importance_weights(logprobs, sampler, mask, cap=1.5)
    assert close(got, [[1.5, e(-1.0), 1.0], [1.0, 1.5, 1.0]])
    got = importance_weights(logprobs, sampler, mask, cap=1.5, mode="mask")
    assert close(got, [[0.0, e(-1.0), 1.0], [1.0, 0.0, 1.0]])
    # per sequence: row 0's log-ratio sums to -0.5, row 1's to 1.0 (e(1) = 2.72, above the cap 2)
    got = importance_weights(logprobs, sampler, mask, cap=2.0, level="sequence")
    assert close(got, [[e(-0.5)] * 3, [2.0] * 3])
    got = importance_weights(logprobs, sampler, mask, cap=2.0, mode="mask", level="sequence")
    assert close(got, [[e(-0.5)] * 3, [0.0] * 3])
    # a token without a sampler log-prob is not corrected
    sampler[1, 1] = float("nan")
    assert importance_weights(logprobs, sampler, mask, cap=1.5)[1].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_weights_equal_trls_installed_formula(mode, level):
    from trl.trainer.grpo_trainer import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    diff = source.index("per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps)")
    start = source.rindex("mask = completion_mask if tool_mask is None", 0, diff)  # the line just before it
    start = source.rindex("\n", 0, start) + 1  # from the start of that line
    end = source.index("# Compute the per-token log probabilities for the reference model")
    block = textwrap.dedent(source[start : source.rindex("\n", 0, end) + 1])
    torch.manual_seed(0)
    old, sampling = torch.randn(4, 6) * 0.5 - 2, torch.randn(4, 6) * 0.5 - 2
    mask = torch.ones(4, 6)
    mask[1, 3:], mask[2, 5:] = 0, 0
    cap = 1.4 if level == "token" else 2.5
    trl_self = SimpleNamespace(
        vllm_importance_sampling_mode=f"{'token' if level == 'token' else 'sequence'}_{mode}",
        vllm_importance_sampling_clip_max=cap, vllm_importance_sampling_clip_min=None,
    )
    scope = {"torch": torch, "math": math, "self": trl_self, "old_per_token_logps": old,
             "sampling_per_token_logps": sampling, "completion_mask": mask, "tool_mask": None}
    exec(block, scope)  # noqa: S102 - trl's own code, read from the installed package
    expected = scope["vllm_importance_sampling_ratio"].expand(4, 6)  # (B, T), or (B, 1) per sequence
    got = importance_weights(old, sampling, mask, cap, mode, level)
    assert torch.allclose(got, expected, atol=1e-6)
    assert 0 < (got != 1).sum()  # the example exercises the cap


def test_sampler_mismatch_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -5.0]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    got = {k: float(v) for k, v in sampler_mismatch(logprobs, sampler, mask).items()}
    d = [0.5, -1.0]  # logp - logp_sampler on the two response tokens
    assert got["tokens"] == 2
    assert got["abs_diff"] == pytest.approx(1.5)
    assert got["kl_k1"] == pytest.approx(0.5)  # sum of -d
    assert got["kl_k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in d))


# ---- the losses the weights multiply ----


def test_policy_loss_multiplies_each_tokens_loss_by_its_weight():
    torch.manual_seed(1)
    logprobs, old, adv = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    weights = torch.rand(3, 5) * 2
    ratio = torch.exp(logprobs - old)
    per_token = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)) * weights
    loss, _, _ = losses.policy_loss(logprobs, old, adv, mask, 0.2, is_weights=weights)
    assert loss == pytest.approx(float((per_token * mask).sum() / mask.sum()), rel=1e-6)
    ones, _, _ = losses.policy_loss(logprobs, old, adv, mask, 0.2, is_weights=torch.ones(3, 5))
    assert ones == losses.policy_loss(logprobs, old, adv, mask, 0.2)[0]


def test_grpo_loss_weights_the_clipped_term_not_the_kl():
    torch.manual_seed(2)
    logprobs, old, ref = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    adv, mask, weights = torch.randn(2), torch.ones(2, 4), torch.full((2, 4), 0.5)
    coef = torch.exp(logprobs - old)
    pg = -torch.min(coef * adv[:, None], coef.clamp(0.8, 1.2) * adv[:, None])
    kl = torch.exp(ref - logprobs) - (ref - logprobs) - 1
    loss, _, _ = losses.grpo_loss(logprobs, old, adv, mask, 0.2, beta=0.1, ref_logprobs=ref, is_weights=weights)
    assert loss == pytest.approx(float((0.5 * pg + 0.1 * kl).mean()), rel=1e-6)


def test_rloo_loss_weights_each_sequence():
    logprobs, old = torch.zeros(2, 3), torch.zeros(2, 3)
    adv, mask = torch.tensor([1.0, -2.0]), torch.ones(2, 3)
    loss, _, _ = losses.rloo_loss(logprobs, old, adv, mask, 0.2, is_weights=torch.tensor([0.5, 3.0]))
    assert float(loss) == pytest.approx((-0.5 * 1.0 + 3.0 * 2.0) / 2)


def test_experience_select_carries_the_weights():
    weights = torch.arange(12.0).view(3, 4)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    exp = Experience(input_ids=torch.ones(3, 2, dtype=torch.long), attention_mask=torch.ones(3, 2, dtype=torch.long),
                     response_ids=torch.zeros(3, 4, dtype=torch.long), mask=mask, logprobs=torch.zeros(3, 4),
                     advantages=torch.zeros(3, 4), is_weights=weights)
    mb = exp.select(torch.tensor([0, 2]))
    assert mb.is_weights.tolist() == [[0.0, 1.0], [8.0, 9.0]]


# ---- replies into Samples ----


def test_samples_are_cut_by_their_lengths_when_eos_pads():
    # no pad token: EOS (1) pads, so a row cut at the cap must not read its padding as an end
    completions = [Completion([5, 6, 1], [-0.1, -0.2, -0.3]), Completion([7], [-0.5]), Completion([8, 9, 10, 11], [-1.0] * 4)]
    s = samples_from_completions(completions, end_ids=[1, 2], pad_id=1, device=torch.device("cpu"))
    assert s.response_ids.tolist() == [[5, 6, 1, 1], [7, 1, 1, 1], [8, 9, 10, 11]]
    assert s.mask.tolist() == [[True, True, True, False], [True, False, False, False], [True] * 4]
    assert close(s.sampler_logprobs, [[-0.1, -0.2, -0.3, 0], [-0.5, 0, 0, 0], [-1.0] * 4])


def test_sampling_fields_follow_the_generate_kwargs():
    kwargs = {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_new_tokens": 4, "max_new_tokens": 9,
              "eos_token_id": [1, 7], "pad_token_id": 1, "do_sample": True}
    assert vllm_sampling(kwargs) == {"temperature": 0.7, "top_k": -1, "top_p": 1.0, "min_tokens": 4,
                                     "stop_token_ids": [1, 7]}


def test_max_lora_rank_rounds_up_to_what_vllm_accepts():
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 32, 33)] == [1, 8, 8, 16, 32, 64]
    with pytest.raises(EngineError, match="lora_r=1000"):
        max_lora_rank(1000)


# ---- a fake server: stdlib http.server in a thread ----


class FakeVLLM(BaseHTTPRequestHandler):
    """Answers as vLLM does, or as `server.mode` says it must fail."""

    def log_message(self, *args):
        pass

    def reply(self, status, payload):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(200, b"") if self.path == "/health" else self.reply(404, {"detail": "Not Found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        mode = self.server.mode
        if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return self.reply(200, b"Success")
        if self.path != "/v1/completions":
            return self.reply(404, {"detail": "Not Found"})
        if mode == "slow":
            time.sleep(1.5)
        if mode == "http500":
            return self.reply(500, {"error": "engine dead"})
        if mode == "not_json":
            return self.reply(200, b"<html>proxy</html>")
        # a response of 3 tokens chosen by the seed, the seed's log-probs
        seed = body["seed"]
        ids = [10 + seed % 50, 11, 12][: body["max_tokens"]]
        choice = {"index": 0, "text": "x", "token_ids": ids, "logprobs": {"token_logprobs": [-0.5] * len(ids)}}
        if mode == "no_token_ids":
            del choice["token_ids"]
        if mode == "short_logprobs":
            choice["logprobs"]["token_logprobs"] = [-0.5]
        self.reply(200, {"choices": [choice]})


@pytest.fixture
def fake_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    server.mode, server.requests = "ok", []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url_of(server):
    return f"http://127.0.0.1:{server.server_address[1]}"


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAMPLING = {"temperature": 1.0, "top_k": -1, "top_p": 1.0, "min_tokens": 0, "stop_token_ids": [1]}


def test_client_reads_ids_and_logprobs(fake_server):
    got = VLLMClient(url_of(fake_server), timeout_s=5).complete("m", [0, 5, 6], 8, seed=3, sampling=SAMPLING)
    assert got == Completion([13, 11, 12], [-0.5, -0.5, -0.5])
    path, body = fake_server.requests[-1]
    assert path == "/v1/completions" and body["prompt"] == [0, 5, 6] and body["return_token_ids"] is True
    assert body["logprobs"] == 0 and body["seed"] == 3 and body["stop_token_ids"] == [1]


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("no_token_ids", "malformed reply from the vLLM server at .*/v1/completions: no list of sampled token ids"),
        ("short_logprobs", "malformed reply .* expected 3 log-probs"),
        ("not_json", "malformed reply .* not JSON"),
        ("http500", "answered /v1/completions with HTTP 500"),
    ],
)
def test_a_bad_reply_is_one_error(fake_server, mode, message):
    fake_server.mode = mode
    with pytest.raises(EngineError, match=message):
        VLLMClient(url_of(fake_server), timeout_s=5).complete("m", [0, 5], 8, seed=1, sampling=SAMPLING)


def test_a_late_reply_is_one_error_within_the_timeout(fake_server):
    fake_server.mode = "slow"
    start = time.monotonic()
    with pytest.raises(EngineError, match=r"did not answer /v1/completions within model.rollout.timeout_s=0.3 s"):
        VLLMClient(url_of(fake_server), timeout_s=0.3).complete("m", [0], 8, seed=1, sampling=SAMPLING)
    assert time.monotonic() - start < 1.4


def test_nothing_listening_and_a_wrong_path_are_one_error_each(fake_server):
    with pytest.raises(EngineError, match=r"no vLLM server answers at http://127.0.0.1:\d+ .*check model.rollout.vllm_url"):
        VLLMClient(f"http://127.0.0.1:{closed_port()}", timeout_s=2).complete("m", [0], 8, seed=1, sampling=SAMPLING)
    with pytest.raises(EngineError, match=r"at http://127.0.0.1:\d+/nope answered /v1/completions with HTTP 404"):
        VLLMClient(url_of(fake_server) + "/nope", timeout_s=2).complete("m", [0], 8, seed=1, sampling=SAMPLING)


def test_a_server_that_cannot_start_is_one_error(tmp_path):
    with pytest.raises(EngineError, match="vllm_python='/no/such/python' does not exist"):
        VLLMServer("/no/such/python", "m", 8, "float32", tmp_path / "log").start()
    with pytest.raises(EngineError, match=r"exited with code 1 while starting .*No module named"):
        VLLMServer(sys.executable, "m", 8, "float32", tmp_path / "log", startup_timeout_s=60).start()


# ---- the engine against the fake server: adapter sync, seeds, Samples ----


@pytest.fixture(scope="module")
def tiny_policy(tiny_cache):
    from detox_lightning.offline.builtin import resolve

    policy, tokenizer = build_policy(PolicyConfig(model_name_or_path=resolve("builtin:tiny-llama"), lora_r=4), value_head=False)
    return policy, tokenizer, architecture_of(policy.pretrained_model.config)


def test_engine_syncs_changed_weights_and_seeds_each_row(fake_server, tiny_policy, tmp_path):
    policy, _, arch = tiny_policy
    engine = VLLMEngine(url_of(fake_server), sys.executable, "m", lora_rank=4)
    engine.workdir = tmp_path
    input_ids = torch.tensor([[1, 0, 5, 6], [0, 7, 8, 9]])  # left-padded with EOS (1)
    attention_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    kwargs = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_new_tokens": 0, "max_new_tokens": 2,
              "eos_token_id": [1], "pad_token_id": 1}
    torch.manual_seed(0)
    first = engine.sample(policy, arch, input_ids, attention_mask, kwargs)
    loads = [b for p, b in fake_server.requests if p == "/v1/load_lora_adapter"]
    completions = [b for p, b in fake_server.requests if p == "/v1/completions"]
    assert len(loads) == 1 and engine.syncs == 1
    adapter = Path(loads[0]["lora_path"])
    assert (adapter / "adapter_model.safetensors").is_file() and adapter.parent == tmp_path / "adapters"
    seeds = {tuple(c["prompt"]): c["seed"] for c in completions}  # requests run concurrently, in any order
    assert set(seeds) == {(0, 5, 6), (0, 7, 8, 9)}  # unpadded token ids
    assert all(c["model"] == loads[0]["lora_name"] and c["max_tokens"] == 2 for c in completions)
    assert len(set(seeds.values())) == 2
    assert first.response_ids.shape == (2, 2) and first.sampler_logprobs.shape == (2, 2)

    # the same weights: no new adapter; the same torch seed: the same request seeds
    torch.manual_seed(0)
    engine.sample(policy, arch, input_ids, attention_mask, kwargs)
    assert engine.syncs == 1 and {tuple(c["prompt"]): c["seed"] for _, c in fake_server.requests[-2:]} == seeds

    # changed weights: a new adapter under a new name, the old one unloaded and deleted
    with torch.no_grad():
        next(p for n, p in policy.named_parameters() if "lora_B" in n).add_(0.1)
    engine.sample(policy, arch, input_ids, attention_mask, kwargs)
    loads = [b for p, b in fake_server.requests if p == "/v1/load_lora_adapter"]
    unloads = [b for p, b in fake_server.requests if p == "/v1/unload_lora_adapter"]
    assert engine.syncs == 2 and loads[1]["lora_name"] != loads[0]["lora_name"]
    assert unloads == [{"lora_name": loads[0]["lora_name"]}] and not adapter.exists()
    assert fake_server.requests[-1][1]["model"] == loads[1]["lora_name"]
    assert adapter_digest(policy.pretrained_model) in loads[1]["lora_name"]


# ---- settings and the CLI's one line ----


def test_rollout_settings_are_checked():
    from detox_lightning.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        check_settings(8, RLSettings(logprobs_from_generate=True), GenerationSettings(),
                       RolloutSettings(engine="vllm", vllm_url="localhost:8000", timeout_s=0, importance_sampling_cap=0.5))
    text = str(err.value)
    for part in ("model.rollout.vllm_url='localhost:8000' must be an http:// or https:// URL",
                 "model.rollout.timeout_s=0 must be greater than 0", "model.rollout.importance_sampling_cap=0.5 must be at least 1",
                 "model.ppo.logprobs_from_generate=True needs the trainer's own generate"):
        assert part in text
    with pytest.raises(ConfigError, match="model.rollout.engine='sglang' is not one of generate, vllm"):
        check_settings(8, RLSettings(), GenerationSettings(), RolloutSettings(engine="sglang"))


def train(*args):
    return subprocess.run([sys.executable, "train.py", "fit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


def error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_vllm_with_t5_is_one_error_line(tmp_path):
    result = train("--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path),
                   "--model.init_args.rollout.engine", "vllm")
    assert "model.rollout.engine='vllm' serves decoder-only policies" in error_line(result)
    assert "use model.rollout.engine=generate" in error_line(result)


H64 = ["--config", "configs/tiny_causal.yaml", "--model.init_args.policy.model_name_or_path", "builtin:tiny-llama-h64",
       "--trainer.limit_train_batches", "1"]


@pytest.mark.slow
def test_a_server_down_or_malformed_is_one_error_line_and_the_checkpoint_stays(tmp_path, fake_server):
    ok = train(*H64, "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks=[]",
               "--trainer.callbacks+=detox_lightning.io.RLCheckpoint")
    assert ok.returncode == 0, ok.stderr[-3000:]
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    vllm = ["--model.init_args.rollout.engine", "vllm", "--trainer.max_epochs", "2", "--ckpt_path", "last",
            "--trainer.callbacks=[]", "--trainer.callbacks+=detox_lightning.io.RLCheckpoint"]

    down = train(*H64, "--trainer.default_root_dir", str(tmp_path), *vllm,
                 "--model.init_args.rollout.vllm_url", f"http://127.0.0.1:{closed_port()}")
    assert "no vLLM server answers at http://127.0.0.1:" in error_line(down)
    fake_server.mode = "no_token_ids"
    malformed = train(*H64, "--trainer.default_root_dir", str(tmp_path), *vllm, "--model.init_args.rollout.vllm_url",
                      url_of(fake_server))
    assert "malformed reply from the vLLM server" in error_line(malformed)
    assert last.read_bytes() == before  # nothing lost: the last checkpoint is as it was, and loads
    assert torch.load(last, weights_only=True)["ppo_state"]["iterations"] == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_started_server_dies_with_a_killed_trainer(tmp_path):
    """A SIGKILLed trainer leaves no server behind: the server command asks for SIGTERM on its parent's death."""
    fake = tmp_path / "vllm" / "entrypoints" / "openai"
    fake.mkdir(parents=True)
    for folder in (tmp_path / "vllm", tmp_path / "vllm" / "entrypoints", fake):
        (folder / "__init__.py").write_text("")
    (fake / "api_server.py").write_text("import time\ntime.sleep(600)\n")  # a server that never exits by itself
    code = (
        "import subprocess, sys, time\n"
        "from detox_lightning.models.vllm_server import VLLMServer\n"
        "server = subprocess.Popen(VLLMServer(sys.executable, 'm', 8, 'float32', 'log').command(1))\n"
        "print(server.pid, flush=True)\ntime.sleep(600)\n"
    )
    trainer = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    server_pid = int(trainer.stdout.readline())
    time.sleep(1.0)
    assert alive(server_pid)
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 10
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(server_pid)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state
