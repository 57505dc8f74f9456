"""Offline stand-ins for the benchmark: FLAN-T5-, Llama- and RoBERTa-shaped models, a tokenizer, prompts.

The models have the real shapes with random weights, saved with `save_pretrained` and loaded back
through the project's own `from_pretrained` code. The tokenizer is a BPE trained on the sample
dialogues (~4 characters a token, as T5's on English dialogue), padded with filler pieces up to
FLAN-T5's 32,128 ids so that any sampled id decodes to text. The Llama-shaped policy
(`--policy causal`) has the same vocabulary and about the same parameter count as the T5 shape
of the same name, so the two architectures compare at equal size.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SHAPES = {  # T5Config fields of google/flan-t5-{small,base}; tiny is for tests
    "tiny": {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2, "num_decoder_layers": 2},
    "small": {"d_model": 512, "d_ff": 1024, "d_kv": 64, "num_heads": 6, "num_layers": 8, "num_decoder_layers": 8},
    "base": {"d_model": 768, "d_ff": 2048, "d_kv": 64, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12},
}
CAUSAL_SHAPES = {  # LlamaConfig fields; untied 32,128-id embeddings: small ~71 M parameters (FLAN-T5-small 77 M), base ~219 M (248 M)
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
             "num_hidden_layers": 2},
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_attention_heads": 8, "num_key_value_heads": 8,
              "num_hidden_layers": 12},
    "base": {"hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12, "num_key_value_heads": 12,
             "num_hidden_layers": 24},
}
POLICIES = ("seq2seq", "causal")
REWARD_SHAPES = {  # RobertaConfig fields of roberta-base (the hate classifier's shape); tiny for tests
    "tiny": {"vocab_size": 1000, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 514},
    "base": {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 514},
}
T5_VOCAB = 32128
BPE_VOCAB = 700  # gives ~4 characters a token on the sample dialogues


def _corpus(n: int = 1000) -> list[str]:
    from detox_lightning.data.datamodule import NOTEBOOK_PROMPT
    from detox_lightning.offline import sample_data

    rows = sample_data.make_dialogues(n, seed=12345, toxic_fraction=0.5)
    return [NOTEBOOK_PROMPT.format(dialogue=r["dialogue"]) for r in rows] + [r["summary"] for r in rows]


def _pad_vocab(tokenizer, size: int):
    """Extend a BPE vocabulary with unreachable filler pieces up to `size` ids.

    The fillers are never produced by encoding (no merge leads to them) but decode to 3-6 letter
    words, so responses sampled from a 32,128-id model decode to text of realistic length.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < size:
        piece = "\u2581" + "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        vocab.setdefault(piece, len(vocab))
    fast = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(
        tokenizer_object=fast,
        model_max_length=tokenizer.model_max_length,
        clean_up_tokenization_spaces=False,
        **tokenizer.special_tokens_map,
    )


def build_models(root: Path, shape: str, reward_shape: str, policy: str = "seq2seq") -> tuple[str, str]:
    """Save a FLAN-T5- (or Llama-) shaped policy and a RoBERTa-shaped nothate/hate classifier under `root`."""
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    from detox_lightning.offline.builtin import train_tokenizer

    corpus = _corpus(200 if shape == "tiny" else 1000)  # tests need speed, not realistic lengths
    if policy == "causal":
        return build_causal_policy(root / "policy", shape, corpus), build_reward(root / "reward", reward_shape, corpus)
    t5_tok = train_tokenizer(
        corpus, BPE_VOCAB, {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        single="$A </s>", pair="$A </s> $B </s>", model_max_length=1024,
    )
    t5_tok = _pad_vocab(t5_tok, T5_VOCAB)
    config = T5Config(
        vocab_size=T5_VOCAB, feed_forward_proj="gated-gelu", dropout_rate=0.1, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **SHAPES[shape],
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)  # untied, as FLAN-T5
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    policy_dir = root / "policy"
    model.save_pretrained(policy_dir)
    t5_tok.save_pretrained(policy_dir)
    del model
    return str(policy_dir), build_reward(root / "reward", reward_shape, corpus)


def build_causal_policy(policy_dir: Path, shape: str, corpus: list[str]) -> str:
    """A Llama-shaped causal LM (random weights, seed 0): BOS before each prompt, EOS as padding."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from detox_lightning.offline.builtin import train_tokenizer

    tokenizer = train_tokenizer(
        corpus, BPE_VOCAB, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
        single="<s> $A", pair="<s> $A $B", model_max_length=2048,
    )
    tokenizer = _pad_vocab(tokenizer, T5_VOCAB)
    config = LlamaConfig(vocab_size=T5_VOCAB, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=1, **CAUSAL_SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    return str(policy_dir)


def build_reward(reward_dir: Path, reward_shape: str, corpus: list[str] | None = None) -> str:
    """Save a RoBERTa-shaped nothate/hate classifier (random weights, seed 0) with its BPE tokenizer."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from detox_lightning.offline.builtin import train_tokenizer

    corpus = corpus or _corpus(200 if reward_shape == "tiny" else 1000)
    rob_tok = train_tokenizer(
        corpus, BPE_VOCAB, {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
    )
    rconfig = RobertaConfig(
        type_vocab_size=1, bos_token_id=0, pad_token_id=1, eos_token_id=2,
        id2label={0: "nothate", 1: "hate"}, label2id={"nothate": 0, "hate": 1}, **REWARD_SHAPES[reward_shape],
    )
    torch.manual_seed(0)
    classifier = RobertaForSequenceClassification(rconfig)
    classifier.save_pretrained(reward_dir)
    rob_tok.save_pretrained(reward_dir)
    return str(reward_dir)


def make_prompts(tokenizer, n: int, seed: int) -> list[dict]:
    """`n` tokenized notebook prompts from sample dialogues of 200 < characters <= 1000 (the notebook's filter)."""
    from detox_lightning.data.datamodule import NOTEBOOK_PROMPT
    from detox_lightning.offline import sample_data

    rows = [r for r in sample_data.make_dialogues(3 * n + 50, seed=seed) if 200 < len(r["dialogue"]) <= 1000][:n]
    prompts = []
    for row in rows:
        ids = tokenizer(NOTEBOOK_PROMPT.format(dialogue=row["dialogue"]))["input_ids"]
        prompts.append({"input_ids": ids, "query": tokenizer.decode(ids, skip_special_tokens=True),
                        "chars": len(NOTEBOOK_PROMPT.format(dialogue=row["dialogue"]))})
    return prompts


def collate(tokenizer, rows: list[dict]) -> dict:
    """Padded to the longest prompt of these rows, on the tokenizer's side (as `DialogSumDataModule.collate`)."""
    batch = tokenizer.pad({"input_ids": [r["input_ids"] for r in rows]}, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "query": [r["query"] for r in rows]}


def repeat_rows(batch: dict, k: int) -> dict:
    """Each prompt k times in a row, as the module repeats them for k samples per prompt."""
    if k == 1:
        return batch
    return {"input_ids": batch["input_ids"].repeat_interleave(k, dim=0),
            "attention_mask": batch["attention_mask"].repeat_interleave(k, dim=0),
            "query": [q for q in batch["query"] for _ in range(k)]}


def prompt_length(ids: list[int], low: int, high: int, seed: int = 0) -> int:
    """A response length drawn from [low, high) for this prompt: the same in every way and process."""
    return random.Random(hash((seed, *ids))).randrange(low, high)  # tuples of ints hash the same in every process


class RowLengths:
    """A logits processor that ends row i with EOS as its `lengths[i]`-th new token, and bans EOS before.

    Put first: the sampler after it (multinomial or inverse CDF) then draws EOS with probability 1
    where it is forced. Counts new tokens from the length of `input_ids` at its first call.
    """

    def __init__(self, lengths: torch.Tensor, eos: int) -> None:
        self.lengths, self.eos, self.start = lengths, eos, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.start = input_ids.shape[1] if self.start is None else self.start
        index = input_ids.shape[1] - self.start + 1  # the new token about to be drawn, counted from 1
        lengths = self.lengths.to(scores.device)
        scores = scores.clone()
        scores[index < lengths, self.eos] = float("-inf")
        forced = index == lengths
        scores[forced] = float("-inf")
        scores[forced, self.eos] = 0.0
        return scores


def draw_lengths_per_prompt(policy, low: int, high: int, seed: int = 0) -> None:
    """Every `policy.generate` (this module's, the notebook's loop's, the floor's, the evaluation's)
    gives each prompt its own response length from [low, high), as the notebook's `LengthSampler`
    draws one per prompt: a batch runs to its longest row, the shorter rows padded after their EOS."""
    from transformers import LogitsProcessorList

    generate = policy.generate

    def generate_with_lengths(*args, input_ids, attention_mask, **kwargs):
        lengths = torch.tensor([prompt_length(ids[m.bool()].tolist(), low, high, seed)
                                for ids, m in zip(input_ids, attention_mask, strict=True)])
        eos = kwargs["eos_token_id"]
        first = RowLengths(lengths, eos[0] if isinstance(eos, list) else eos)
        kwargs["logits_processor"] = LogitsProcessorList([first, *(kwargs.get("logits_processor") or [])])
        kwargs["max_new_tokens"] = int(lengths.max())
        return generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    policy.generate = generate_with_lengths


def make_reward(args, reward_dir: str, quantize: str | None = None):
    """The reward classifier; `quantize` None: as `--reward-quantize` says."""
    from detox_lightning.rewards import HFClassifierReward

    return HFClassifierReward(reward_dir, batch_size=args.reward_batch_size, quantize=quantize or args.reward_quantize)


def make_module(args, policy_dir: str, reward_dir: str, reward_quantize: str | None = None):
    from detox_lightning.models import PolicyConfig
    from detox_lightning.training import GenerationSettings, RLDetoxModule, RLSettings

    cap = args.new_tokens_range[1] - 1 if args.new_tokens_range else args.new_tokens
    return RLDetoxModule(
        reward=make_reward(args, reward_dir, reward_quantize),
        policy=PolicyConfig(model_name_or_path=policy_dir, dtype=args.dtype),
        ppo=RLSettings(mini_batch_size=args.mini_batch_size, gradient_accumulation_steps=args.grad_accum, ppo_epochs=1,
                        gradient_checkpointing=args.gradient_checkpointing, advantage_estimator=args.estimator,
                        samples_per_prompt=args.samples_per_prompt, init_kl_coef=args.init_kl_coef,
                        adap_kl_ctrl=not args.fixed_kl),
        # every response is exactly new_tokens long: EOS is masked until then (min_length counts the start token);
        # with --new-tokens-range each prompt's own length (`draw_lengths_per_prompt`) under a cap of the range's top
        generation=GenerationSettings(min_length=1 if args.new_tokens_range else args.new_tokens + 1,
                                      output_min_length=cap, output_max_length=cap, fast_sampling=args.generation == "fast"),
        batch_size=args.batch_size,
    )


