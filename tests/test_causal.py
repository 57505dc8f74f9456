"""Decoder-only policies: alignment of left-padded rollouts, exact first step, the real CLI, data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tensorboard_scalars
from transformers import LogitsProcessor, LogitsProcessorList

from detox_lightning.models.architectures import CAUSAL
from detox_lightning.models.policy import PolicyConfig, build_policy, reference_mode
from detox_lightning.models.rollout import logprobs_and_values, sample, score_rollout, token_logprobs

ROOT = Path(__file__).resolve().parents[1]


class EndRowEarly(LogitsProcessor):
    """Test only: make row `row` emit EOS at its `step`-th new token, so responses end at different lengths."""

    def __init__(self, prompt_width, eos, ends):
        self.prompt_width, self.eos, self.ends = prompt_width, eos, ends

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        scores = scores.clone()  # generate keeps the tensor it passes in as the step's raw logits
        for row, end in self.ends.items():
            if step == end:
                scores[row] = float("-inf")
                scores[row, self.eos] = 0.0
        return scores


def left_padded_prompts(tokenizer):
    texts = ["#Person1#: Hi.", "#Person1#: Where is the station? #Person2#: Down the road, on the left.",
             "#Person2#: Thanks for dinner, it was lovely.", "Summary:"]
    return tokenizer(texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("keep_logits", [True, False])
def test_left_padded_rollout_equals_per_row_unpadded_forward(tiny_llama, perturbed_causal_adapter, keep_logits):
    model, tokenizer = build_policy(PolicyConfig(model_name_or_path=tiny_llama, adapter_name_or_path=perturbed_causal_adapter))
    model.eval()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == tokenizer.eos_token_id  # no pad token of its own
    enc = left_padded_prompts(tokenizer)
    width = enc.input_ids.shape[1]
    assert (enc.attention_mask[:, 0] == 0).any()  # some prompts really are padded
    eos = tokenizer.eos_token_id
    kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": 10, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": eos, "logits_processor": LogitsProcessorList([EndRowEarly(width, eos, {1: 3, 2: 6})])}
    torch.manual_seed(0)
    samples = sample(model, CAUSAL, enc.input_ids, enc.attention_mask, kwargs, keep_logits=keep_logits)
    lengths = samples.mask.sum(dim=1).tolist()
    assert lengths[1] == 4 and lengths[2] == 7  # up to and including the forced EOS
    for row, length in enumerate(lengths):  # the mask is exactly the tokens up to the first EOS
        ids = samples.response_ids[row]
        first_eos = next((t for t in range(ids.shape[0]) if ids[t] == eos), None)
        assert length == (first_eos + 1 if first_eos is not None and samples.mask[row, first_eos] else ids.shape[0])
    scores = score_rollout(model, CAUSAL, samples, enc.input_ids, enc.attention_mask, 1.0, 3, lambda: reference_mode(model))
    with torch.no_grad():
        for row, length in enumerate(lengths):
            prompt = enc.input_ids[row][enc.attention_mask[row].bool()]  # the prompt without its padding
            ids = torch.cat([prompt, samples.response_ids[row, :length]])[None]
            logits, _, values = model(input_ids=ids)
            p = prompt.shape[0]
            want_lp = token_logprobs(logits[:, p - 1 : p - 1 + length], samples.response_ids[row : row + 1, :length], 1.0)
            torch.testing.assert_close(scores.logprobs[row, :length], want_lp[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(scores.values[row, :length], values[0, p - 1 : p - 1 + length], rtol=0, atol=1e-5)
            assert (scores.logprobs[row, length:] == 0).all()
    # the same through the update's teacher-forced pass (the whole batch, left-padded)
    with torch.no_grad():
        _, logprobs, values = logprobs_and_values(model, CAUSAL, enc.input_ids, enc.attention_mask,
                                                  samples.response_ids, samples.mask, 1.0)
    m = samples.mask
    torch.testing.assert_close(logprobs[m], scores.logprobs[m], rtol=0, atol=1e-5)
    torch.testing.assert_close(values[m], scores.values[m], rtol=0, atol=1e-5)


def test_causal_policy_lora_is_peft_default_and_trains_only_policy_and_value_head(tiny_llama):
    model, _ = build_policy(PolicyConfig(model_name_or_path=tiny_llama, lora_r=4))
    config = model.pretrained_model.peft_config["policy"]
    assert config.task_type == "CAUSAL_LM" and set(config.target_modules) == {"q_proj", "v_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n and ".policy." in n) or n.startswith("v_head.") for n in trainable)


def run_train(*args, timeout=900):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def scalars(root):
    return tensorboard_scalars(root)


def assert_first_iteration_exact(tmp_path, adapter, dtype, *args):
    """One iteration of configs/tiny_causal.yaml (with `args`) from a non-zero `adapter`, 200-token
    responses: the policy equals its reference, so KL 0 and ratio 1 (exactly 1 in bfloat16)."""
    config = yaml.safe_load((ROOT / "configs" / "tiny_causal.yaml").read_text())
    config["trainer"]["callbacks"] = []
    config["trainer"]["enable_checkpointing"] = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    result = run_train("fit", "--config", str(tmp_path / "c.yaml"), "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.limit_train_batches", "1", "--model.init_args.policy.dtype", dtype,
                       "--model.init_args.policy.adapter_name_or_path", adapter,
                       "--model.init_args.generation.output_min_length", "200",
                       "--model.init_args.generation.output_max_length", "200", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = scalars(tmp_path)
    assert logged["tokens/responses_len_mean"][0] > 50
    assert abs(logged["objective/kl"][0]) < 1e-4, logged["objective/kl"]
    assert abs(logged["ppo/policy/ratio_first"][0] - 1) < 1e-3, logged["ppo/policy/ratio_first"]
    if dtype == "bfloat16":  # old log-probs from a forward in the first update's micro-batches: the same bits
        assert logged["ppo/policy/ratio_first"][0] == 1.0, logged["ppo/policy/ratio_first"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_causal_first_iteration_kl_is_zero_and_ratio_one(tmp_path, perturbed_causal_adapter, dtype):
    assert_first_iteration_exact(tmp_path, perturbed_causal_adapter, dtype)


def test_tiny_causal_config_trains_and_exports_a_causal_adapter(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = run_train("fit", "--config", "configs/tiny_causal.yaml", "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "lightning_logs" / "version_0"
    logged = scalars(run)
    assert len(logged["objective/kl"]) == 3 and len(logged["env/reward_mean"]) == 3
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in k or "v_head" in k for k in checkpoint["state_dict"])
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter))
    trained = {k.replace(".policy", ""): v for k, v in checkpoint["state_dict"].items() if "lora_" in k}
    loaded = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    assert trained.keys() == {"pretrained_model." + k for k in loaded} or len(trained) == len(loaded)


def rtp_like_file(tmp_path):
    """RealToxicityPrompts' shape: the text and its toxicity nested under `prompt`, no summary."""
    from helpers import write_jsonl

    rows = []
    for i in range(24):
        toxicity = None if i % 6 == 5 else (i % 6) / 10 + 0.05  # 0.05 .. 0.45, and a missing value
        rows.append({"prompt": {"text": f"#Person1#: Tell me about the trip number {i}, and", "toxicity": toxicity},
                     "continuation": {"text": " more.", "toxicity": 0.1}})
    return write_jsonl(tmp_path / "rtp.jsonl", rows), rows


def test_prompt_dataset_filters_on_a_nested_numeric_field(tmp_path, tiny_llama):
    from detox_lightning import DialogSumDataModule

    path, rows = rtp_like_file(tmp_path)
    data = DialogSumDataModule(path=path, text_column="prompt.text", filter="prompt.toxicity > 0.3",
                               prompt_template="{dialogue}", prompt_format="plain", min_chars=0, batch_size=2,
                               tokenizer_name_or_path=tiny_llama, test_size=0.25)
    splits = data.load_splits()
    kept = sorted(list(splits["train"]["dialogue"]) + list(splits["test"]["dialogue"]))
    want = sorted(r["prompt"]["text"] for r in rows if r["prompt"]["toxicity"] is not None and r["prompt"]["toxicity"] > 0.3)
    assert kept == want and len(want) == 8  # 0.35 and 0.45 of each six; the missing value is dropped
    data.setup("fit")
    batch = data.collate([data.train_dataset[i] for i in range(2)])
    assert "summary" not in batch and batch["query"][0] in want  # the text as it is, no template


@pytest.mark.slow
def test_causal_fit_on_a_prompt_dataset_without_references_skips_rouge(tmp_path):
    path, _ = rtp_like_file(tmp_path)
    result = run_train("fit", "--config", "configs/tiny_causal.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
                       "--trainer.limit_train_batches", "1", "--data.path", path, "--data.text_column", "prompt.text",
                       "--data.filter", "prompt.toxicity > 0.3", "--data.prompt_template", "{dialogue}",
                       "--data.min_chars", "0", "--data.batch_size", "4", "--data.test_size", "0.5",
                       "--trainer.callbacks.init_args.num_prompts", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "ROUGE is skipped" in output and "ROUGE-L" not in output
    report = json.loads(next((tmp_path / "run").rglob("evaluation_report.json")).read_text())
    assert "eval/toxicity_mean" in report["after"] and "eval/rougeL" not in report["after"]


CAUSAL_BAD_INPUTS = {
    "a model neither seq2seq nor causal": (
        ["--model.init_args.policy.model_name_or_path", "builtin:tiny-hate-roberta"],
        "is a RobertaForSequenceClassification, neither a seq2seq nor a causal language model",
    ),
    "a chat template that fails to render": (
        ["--model.init_args.policy.model_name_or_path", "{broken_chat}"],
        "the tokenizer's chat template does not render a user message",
    ),
    "chat prompts without a chat template": (
        ["--model.init_args.policy.model_name_or_path", "builtin:tiny-t5", "--data.prompt_format", "chat"],
        "data.prompt_format='chat' but the tokenizer has no chat template",
    ),
    "a text column that does not exist": (
        ["--data.path", "{rtp}", "--data.text_column", "prompt.body"],
        "data.text_column='prompt.body': column 'prompt' has no field 'body'; its fields are ['text', 'toxicity']",
    ),
    "a filter on a missing column": (
        ["--data.path", "{rtp}", "--data.text_column", "prompt.text", "--data.filter", "toxicity > 0.3"],
        "data.filter='toxicity': the data has no column 'toxicity'; its columns are ['prompt', 'continuation']",
    ),
    "a filter that leaves nothing": (
        ["--data.path", "{rtp}", "--data.text_column", "prompt.text", "--data.filter", "prompt.toxicity > 0.9"],
        "data.filter='prompt.toxicity > 0.9' keeps 0 of 24 rows",
    ),
    "a filter that does not parse": (
        ["--data.path", "{rtp}", "--data.text_column", "prompt.text", "--data.filter", "prompt.toxicity is high"],
        "is not of the form '<field> <op> <number>'",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CAUSAL_BAD_INPUTS, ids=list(CAUSAL_BAD_INPUTS))
def test_causal_bad_input_is_one_error_line_and_writes_nothing(case, tmp_path, tiny_llama):
    import shutil

    args, message = CAUSAL_BAD_INPUTS[case]
    broken = tmp_path / "broken_chat"
    shutil.copytree(tiny_llama, broken)
    config_file = broken / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["chat_template"] = "{{ messages[0]['content'] | no_such_filter }}"
    config_file.write_text(json.dumps(tokenizer_config))
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    (broken / "chat_template.jinja").write_text(tokenizer_config["chat_template"])
    files = {"{rtp}": rtp_like_file(tmp_path)[0], "{broken_chat}": str(broken)}
    args = [files.get(a, a) for a in args]
    root = tmp_path / "runs"
    result = run_train("fit", "--config", "configs/tiny_causal.yaml", "--trainer.default_root_dir", str(root), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert not root.exists()


CAUSAL_POLICY = ["--model.init_args.policy.model_name_or_path", "builtin:tiny-llama"]


@pytest.mark.slow
def test_causal_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_llama):
    from test_checkpointing import killed_and_resumed_vs_straight

    got = killed_and_resumed_vs_straight(tmp_path, *CAUSAL_POLICY)
    assert any("q_proj.lora_A" in k for k in got["state_dict"])  # the causal model's own LoRA


@pytest.mark.slow
def test_two_rank_causal_fit_logs_global_statistics(tmp_path, tiny_llama, tiny_classifier, sample_data):
    from test_ddp import fit_on_two_ranks, gloo_unavailable, write_config

    reason = gloo_unavailable()
    if reason:
        pytest.skip(reason)
    probe = tmp_path / "probe"
    result = fit_on_two_ranks(write_config(tmp_path), tmp_path / "run", probe, *CAUSAL_POLICY)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    assert set(ranks[0]["queries"]).isdisjoint(ranks[1]["queries"])  # each rank its own prompts
    for name in ("env/reward_mean", "objective/kl", "ppo/loss/total", "tokens/responses_len_mean"):
        assert ranks[0]["logged"][-1][name] == pytest.approx(ranks[1]["logged"][-1][name], abs=1e-6), name
    # global: the logged reward mean is the mean over both ranks' rollouts
    scores = torch.cat([r["rollout_scores"][-1] for r in ranks])
    assert ranks[0]["logged"][-1]["env/reward_mean"] == pytest.approx(float(scores.mean()), abs=1e-5)
    for name, weight in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], weight, rtol=0, atol=0)


@pytest.mark.slow
def test_causal_quick_start_detoxifies(tmp_path):
    """The README's causal quick start: toxicity falls with a CI below 0 for the reward's classifier
    and for the independent judge, and the exported adapters reload as causal LoRA."""
    adapter = tmp_path / "sft_adapter"
    sft = run_train("fit", "--config", "configs/tiny_causal_sft.yaml", "--trainer.default_root_dir", str(tmp_path / "sft"),
                    "--model.init_args.adapter_dir", str(adapter), timeout=2400)  # ~2.5 min alone; slower on a shared host
    assert sft.returncode == 0, sft.stderr[-3000:]
    detox = run_train("fit", "--config", "configs/tiny_causal_detox.yaml", "--trainer.default_root_dir",
                      str(tmp_path / "detox"), "--model.init_args.policy.adapter_name_or_path", str(adapter), timeout=2400)
    assert detox.returncode == 0, detox.stderr[-3000:]
    report_file = next((tmp_path / "detox").rglob("evaluation_report.json"))
    report = json.loads(report_file.read_text())
    before, after = report["before"], report["after"]
    assert before["eval/toxicity_mean"] > 0.2  # the SFT model did pick up rudeness
    assert after["eval/toxicity_delta_ci_high"] < 0, after
    assert after["eval/judge_toxicity_delta_ci_high"] < 0, after
    assert after["eval/rougeL_delta"] >= -0.05, after
    assert json.loads((report_file.parent / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
