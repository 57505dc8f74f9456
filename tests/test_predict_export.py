"""Putting the adapter to use: `predict` writes scored summaries, `export --merge` a standalone model."""

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import write_jsonl

from detox_lightning import (
    DialogSumDataModule,
    HFClassifierReward,
    PolicyConfig,
    ProfanityCheckReward,
    RewardModel,
    RLDetoxModule,
)
from detox_lightning.cli import main
from detox_lightning.evaluation.predict import PredictionWriter
from detox_lightning.evaluation.toxicity import ToxicityEvaluation
from detox_lightning.export import export_merged
from detox_lightning.training.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def module(tiny_t5, tiny_classifier, perturbed_adapter):
    return RLDetoxModule(
        reward=HFClassifierReward(tiny_classifier),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter),
        generation=GenerationSettings(output_min_length=8, output_max_length=8),
        batch_size=8,
    )


def predict(module, sample_data, root, seed=1234, predict_path=None, num_prompts=16):
    evaluation = ToxicityEvaluation(num_prompts=num_prompts, max_new_tokens=10, batch_size=8, judge=ProfanityCheckReward())
    trainer = pl.Trainer(
        accelerator="cpu", default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[evaluation, PredictionWriter(seed=seed)],
    )
    data = DialogSumDataModule(path=sample_data, batch_size=8, predict_path=predict_path)
    trainer.predict(module, datamodule=data)
    lines = [json.loads(line) for line in (Path(root) / "predictions.jsonl").read_text().splitlines()]
    return trainer, evaluation, lines


def test_predict_writes_one_line_per_dialogue_and_the_same_lines_for_the_same_seed(module, sample_data, tmp_path):
    dialogues = [f"#Person1#: Is the {thing} ready?\n#Person2#: Not yet, sorry." for thing in ("soup", "car", "room")] * 4
    path = write_jsonl(tmp_path / "dialogues.jsonl", [{"dialogue": d, "topic": "x"} for d in dialogues[:-1]] + [{"dialogue": "hi"}])
    dialogues[-1] = "hi"  # short ones too: predict keeps every row, no length filter

    _, _, first = predict(module, sample_data, tmp_path / "a", predict_path=path)
    assert [line["dialogue"] for line in first] == dialogues  # one line per dialogue, in the file's order
    assert set(first[0]) == {"dialogue", "summary", "toxicity", "judge_toxicity"}
    assert all(0 <= line["toxicity"] <= 1 and 0 <= line["judge_toxicity"] <= 1 for line in first)
    _, _, again = predict(module, sample_data, tmp_path / "b", predict_path=path)
    assert again == first
    _, _, other = predict(module, sample_data, tmp_path / "c", seed=99, predict_path=path)
    assert [line["summary"] for line in other] != [line["summary"] for line in first]  # the seed is what fixes them


class TextToxicity(RewardModel):
    """A toxicity that changes with every character of the scored text, so a scorer given other
    texts than the evaluation's (the summary alone, say) cannot match its numbers by chance."""

    def toxicity(self, texts):
        return torch.tensor([(sum(map(ord, t)) % 997) / 997 for t in texts])

    def score(self, texts):
        return -self.toxicity(texts)


def test_predict_scores_as_the_evaluation_does(tiny_t5, perturbed_adapter, sample_data, tmp_path):
    """On the held-out split with the evaluation's seed and batch size, predict samples the
    evaluation's texts, so its toxicity and judge toxicity must be the evaluation's numbers."""
    module = RLDetoxModule(
        reward=TextToxicity(),
        policy=PolicyConfig(model_name_or_path=tiny_t5, adapter_name_or_path=perturbed_adapter),
        generation=GenerationSettings(output_min_length=8, output_max_length=8),
        batch_size=8,
    )
    trainer, evaluation, lines = predict(module, sample_data, tmp_path, num_prompts=16)
    assert len(lines) == len(trainer.datamodule.test_dataset)  # the whole held-out split
    outputs = evaluation.generate_and_score(trainer, module, reference=False)  # its first 16 prompts, 2 batches
    lines = lines[:16]
    assert [line["summary"] for line in lines] == [r[0] for r in outputs.responses]
    assert [line["id"] for line in lines] == trainer.datamodule.test_dataset["id"][:16]
    np.testing.assert_allclose([line["toxicity"] for line in lines], outputs.toxicity[:, 0], rtol=1e-6)
    np.testing.assert_allclose([line["judge_toxicity"] for line in lines], outputs.judge_toxicity[:, 0], rtol=1e-6)
    assert len({line["summary"] for line in lines}) > 1 and len({line["toxicity"] for line in lines}) > 1


def test_predict_from_the_checkpoint_equals_predict_from_the_exported_adapter(tmp_path, caplog):
    """`train.py predict --ckpt_path` and `--model...adapter_name_or_path <run>/adapter` load the same
    policy, so with the same seed they write the same lines."""
    config, files = str(ROOT / "configs" / "tiny.yaml"), tmp_path / "dialogues.jsonl"
    write_jsonl(files, [{"dialogue": f"#Person1#: Where is bus {i}?\n#Person2#: Over there."} for i in range(5)])
    caplog.set_level(logging.INFO)
    main(["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "fit"), "--trainer.limit_train_batches", "1"])
    run = tmp_path / "fit" / "lightning_logs" / "version_0"
    common = ["--data.predict_path", str(files), "--trainer.logger", "false"]
    main(["predict", "--config", config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.default_root_dir", str(tmp_path / "ckpt"), *common])
    main(["predict", "--config", config, "--model.init_args.policy.adapter_name_or_path", str(run / "adapter"),
          "--trainer.default_root_dir", str(tmp_path / "adapter"), *common])
    from_ckpt = (tmp_path / "ckpt" / "predictions.jsonl").read_text().splitlines()
    assert len(from_ckpt) == 5
    assert (tmp_path / "adapter" / "predictions.jsonl").read_text().splitlines() == from_ckpt
    assert any(r.getMessage().startswith(f"predict: 5 summaries of {files}") for r in caplog.records)


# ---- export --merge ----


def test_merged_seq2seq_export_generates_greedily_what_base_plus_adapter_does(tiny_t5, perturbed_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out, auto = export_merged(perturbed_adapter, tmp_path / "merged", base=tiny_t5)
    assert auto is AutoModelForSeq2SeqLM
    merged = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5), perturbed_adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompts = ["#Person1#: Is the soup ready?\n#Person2#: Not yet.", "#Person1#: Where is the bus?"]
    ids = tokenizer(prompts, return_tensors="pt", padding=True)
    expected = with_adapter.generate(**ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(merged.generate(**ids, max_new_tokens=16, do_sample=False), expected)
    plain = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval().generate(**ids, max_new_tokens=16, do_sample=False)
    assert not torch.equal(plain, expected)  # the adapter changes what is generated, so the check above can fail


def test_merged_causal_export_loads_as_a_causal_lm_and_runs_in_a_pipeline(tiny_t5, tmp_path):
    """The model class follows the base model's `is_encoder_decoder`: a decoder-only base exports
    as an `AutoModelForCausalLM`, which a transformers `text-generation` pipeline runs."""
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, pipeline

    tokenizer = AutoTokenizer.from_pretrained(tiny_t5)
    torch.manual_seed(0)
    base_dir, adapter_dir = tmp_path / "gpt2", tmp_path / "adapter"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["c_attn"], task_type=TaskType.CAUSAL_LM)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(adapter_dir)

    out, auto = export_merged(adapter_dir, tmp_path / "merged")
    assert auto is AutoModelForCausalLM
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    ids = tokenizer(["#Person1#: Is the soup ready?"], return_tensors="pt")
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": None}
    expected = with_adapter.generate(**ids, **kwargs)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(merged.generate(**ids, **kwargs), expected)
    generated = pipeline("text-generation", model=str(out))("#Person1#: Is the soup ready?", return_full_text=False, **kwargs)
    assert generated[0]["generated_text"] == tokenizer.decode(expected[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
