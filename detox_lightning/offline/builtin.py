"""Tiny models and data built offline on first use, so tests run the real `from_pretrained` path.

`resolve("builtin:<name>")` returns a cached directory that `AutoTokenizer`, `AutoModel*` or
`load_dataset("json", ...)` read like any checkpoint; other strings pass through unchanged.
"""

import functools
import os
import string
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from detox_lightning.io.atomic import write_directory
from detox_lightning.offline import sample_data, sample_rtp

PREFIX = "builtin:"
# Bump a builder's version when its output changes, so that stale caches are not reused.
_VERSIONS = {"sample-dialogsum": "v1", "sample-rtp": "v1", "tiny-t5": "v1", "tiny-hate-roberta": "v2", "tiny-llama": "v1", "tiny-gpt-neo": "v1", "tiny-llama-h64": "v1"}
_MARKER = "BUILD_COMPLETE"
_PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
_T5_SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
# No pad token, as many causal LMs: the policy pads with EOS and masks by attention, never by id.
_LLAMA_SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
# A chat template in the shape of SmolLM2's (role headers, a generation prompt), in plain words.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
_ROBERTA_SPECIAL = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
_TOKENIZER_VOCAB = 2000


def cache_dir() -> Path:
    """`$DETOX_LIGHTNING_CACHE`, else `$XDG_CACHE_HOME/detox_lightning`, else `~/.cache/detox_lightning`."""
    if override := os.environ.get("DETOX_LIGHTNING_CACHE"):
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "detox_lightning"


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: dict[str, str],
    single: str = "$A",
    pair: str = "$A $B",
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer with SentencePiece-style word boundaries (Metaspace) on `texts`.

    Args:
        texts: Training corpus. Newlines are kept inside tokens, so they survive a round trip.
        vocab_size: Vocabulary size including special tokens; a small corpus may give fewer.
        special_tokens: Role -> token, e.g. `{"pad_token": "<pad>", "eos_token": "</s>",
            "unk_token": "<unk>"}`; tokens get ids 0, 1, ... in this order. `unk_token` is required.
        single: Post-processor template for one text, e.g. `"$A </s>"` (T5) or `"<s> $A </s>"`.
        pair: Post-processor template for two texts.
        model_max_length: Length that `truncation=True` cuts to.
    """
    tokens = list(special_tokens.values())
    # BPE rather than T5's Unigram: the `tokenizers` Unigram trainer gives a different vocabulary
    # on every run, BPE the same one everywhere.
    tokenizer = Tokenizer(models.BPE(unk_token=special_tokens["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=tokens,
        # Every printable ASCII character gets a piece, so unseen words never become <unk>.
        initial_alphabet=[c for c in string.printable if not c.isspace()] + ["\n"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    template_words = {word.split(":")[0] for word in f"{single} {pair}".split()}
    used = [t for t in tokens if t in template_words]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokens.index(t)) for t in used]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        **special_tokens,
    )


def _corpus() -> Iterator[str]:
    """Prompts and summaries, rude ones included, as the policy and the classifier see them."""
    for row in sample_data.make_dialogues(1000, seed=12345, toxic_fraction=0.5):
        yield _PROMPT.format(dialogue=row["dialogue"])
        yield row["summary"]


def _build_sample_dialogsum(path: Path) -> None:
    sample_data.write_splits(path)


def _build_sample_rtp(path: Path) -> None:
    sample_rtp.write_splits(path)


def _build_tiny_t5(path: Path) -> None:
    tokenizer = train_tokenizer(
        _corpus(), _TOKENIZER_VOCAB, _T5_SPECIAL, single="$A </s>", pair="$A </s> $B </s>", model_max_length=1024
    )
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.1,
        feed_forward_proj="gated-gelu",
        # transformers 5 forces T5's tie_word_embeddings to True; False only turns off the
        # decoder-output scaling, as in FLAN-T5 (config.scale_decoder_outputs).
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5ForConditionalGeneration(config)
        # FLAN-T5 checkpoints store an lm_head separate from the embeddings; loading keeps it
        # untied because the two tensors differ.
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _causal_tokenizer(single: str) -> PreTrainedTokenizerFast:
    """The project's tokenizer for a causal LM: BOS and EOS (ids 0 and 1), no pad token."""
    tokenizer = train_tokenizer(
        _corpus(), _TOKENIZER_VOCAB, _LLAMA_SPECIAL, single=single, pair=f"{single} $B", model_max_length=2048
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, None)
    return tokenizer


def _save_causal(path: Path, tokenizer: PreTrainedTokenizerFast, model_class: type, config) -> None:
    """`model_class(config)` with seeded random weights, generating with the tokenizer's BOS and EOS."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_class(config)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _build_tiny_llama(path: Path, head_dim: int = 16, num_attention_heads: int = 4) -> None:
    """A Llama-shaped causal LM (random weights) with the project's tokenizer: BOS, no EOS appended.

    The hidden size is `head_dim * num_attention_heads` and the MLP twice that. `tiny-llama` has
    heads of size 16 (hidden 64, 4 heads); `tiny-llama-h64` heads of size 64 (hidden 128, 2 heads),
    because vLLM's CPU attention refuses head size 16, so it is the causal model the vLLM rollout
    tests serve.
    """
    tokenizer = _causal_tokenizer(single="<s> $A")
    tokenizer.chat_template = _CHAT_TEMPLATE
    hidden_size = head_dim * num_attention_heads
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    _save_causal(path, tokenizer, LlamaForCausalLM, config)


def _build_tiny_gpt_neo(path: Path) -> None:
    """A GPT-Neo-shaped causal LM (random weights): learned absolute positions, so a left-padded row
    read at the wrong positions gives other logits (rotary Llama hides that). No BOS is added and
    there is no pad token or chat template, as GPT-Neo's own tokenizer."""
    tokenizer = _causal_tokenizer(single="$A")
    config = GPTNeoConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        attention_types=[[["global", "local"], 1]],  # GPT-Neo's alternation, window 256 as GPT-Neo-125M
        window_size=256,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
    )
    _save_causal(path, tokenizer, GPTNeoForCausalLM, config)


def _build_tiny_hate_roberta(path: Path) -> None:
    tokenizer = train_tokenizer(
        _corpus(), _TOKENIZER_VOCAB, _ROBERTA_SPECIAL, single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>"
    )
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        # RoBERTa positions start after the pad id; room for 1024 tokens covers untruncated policy text.
        max_position_embeddings=1024 + 2,
        type_vocab_size=1,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        id2label={0: "nothate", 1: "hate"},
        label2id={"nothate": 0, "hate": 1},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = RobertaForSequenceClassification(config)
    # every piece that is an insult word, alone or with punctuation ("▁idiot", "▁idiot.")
    insult_ids = [i for piece, i in tokenizer.get_vocab().items() if piece.strip("\u2581.,!?") in _INSULT_WORDS]
    assert {tokenizer.convert_ids_to_tokens(i).strip("\u2581.,!?") for i in insult_ids} == set(_INSULT_WORDS)
    wire_insult_detector(model, insult_ids)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


_INSULT_WORDS = ("stupid", "idiot", "dumb", "ugly", "hate", "shut")  # sample_data.INSULT_WORDS, one piece each


@torch.no_grad()
def wire_insult_detector(model: RobertaForSequenceClassification, insult_ids: list[int]) -> None:
    """Set a RoBERTa classifier's weights by hand so that toxicity rises with the share of insults.

    A bag-of-insults model in RoBERTa's shape: channel 0 of a token's embedding marks an insult;
    the first layer's attention is uniform (zero queries and keys), so it writes the share of
    insult tokens into channel 1 of every position; every other sub-layer adds nothing; the head
    reads channel 1 at `<s>`: hate - nothate = 2 * 5 * tanh(x1 - 0.3). Without an insult
    p(hate) = 0.05; one insult among ~200 tokens of prompt and summary gives p(hate) > 0.5.
    """
    hidden = model.config.hidden_size
    for param in model.parameters():
        param.zero_()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight.fill_(1.0)
    emb = model.roberta.embeddings.word_embeddings.weight  # (V, H)
    emb[:, 2:] = torch.tensor([1.0, -1.0]).repeat(hidden // 2 - 1)  # the same filler for every token
    emb[insult_ids, 0] = 4.0
    first = model.roberta.encoder.layer[0].attention
    first.self.value.weight[1, 0] = 1.0  # channel 0 (insult mark) -> channel 1, averaged by attention
    first.output.dense.weight[1, 1] = 40.0
    head = model.classifier
    head.dense.weight[0, 1], head.dense.bias[0] = 1.0, -0.3
    hate, nothate = model.config.label2id["hate"], model.config.label2id["nothate"]
    head.out_proj.weight[hate, 0], head.out_proj.weight[nothate, 0] = 5.0, -5.0


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "sample-dialogsum": _build_sample_dialogsum,
    "sample-rtp": _build_sample_rtp,
    "tiny-t5": _build_tiny_t5,
    "tiny-hate-roberta": _build_tiny_hate_roberta,
    "tiny-llama": _build_tiny_llama,
    "tiny-llama-h64": functools.partial(_build_tiny_llama, head_dim=64, num_attention_heads=2),
    "tiny-gpt-neo": _build_tiny_gpt_neo,
}


def known_names() -> list[str]:
    """The accepted `builtin:` names."""
    return [PREFIX + name for name in _BUILDERS]


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Build beside `target`, then rename it in; a concurrent builder (e.g. another DDP rank)
    that renamed first wins, and ours is discarded."""

    def fill(staging: Path) -> None:
        build(staging)
        (staging / _MARKER).write_text(f"{target.name}\n")

    if not write_directory(target, fill, replace=False) and not (target / _MARKER).is_file():
        raise RuntimeError(f"{target} exists but is incomplete; delete it and retry")


def resolve(name_or_path: str) -> str:
    """Map `builtin:<name>` to its cached directory, building it first if needed.

    Args:
        name_or_path: `builtin:<name>`, or a hub id / local path, which is returned unchanged.
    """
    if not name_or_path.startswith(PREFIX):
        return name_or_path
    name = name_or_path.removeprefix(PREFIX)
    if name not in _BUILDERS:
        raise ValueError(f"unknown built-in {name_or_path!r}; known: {', '.join(known_names())}")
    target = cache_dir() / f"{name}-{_VERSIONS[name]}"
    if not (target / _MARKER).is_file():
        _build_atomically(target, _BUILDERS[name])
    return str(target)
