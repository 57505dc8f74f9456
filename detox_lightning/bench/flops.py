"""Arithmetic of an RL iteration's phases, counted from the models' configs and the token counts.

Pure functions (no torch): what a phase costs follows from the layer widths and how many tokens
went through, with padding (`padded`: the rectangles the kernels run on) and without it
(`useful`: each row at its own length). The benchmark (`efficiency.py`) feeds them the token
counts it records and divides by the measured time and by a matmul peak.

What is counted, in multiply-accumulates (MACs; FLOPs = 2 x MACs):

- `linear`: every weight matmul: attention projections (q, k, v, o; T5's cross-attention q, o per
  decoder token and k, v per encoder token), the feed-forward (3 matrices when gated: T5's
  gated-gelu, Llama's SwiGLU; 2 for RoBERTa), the LM head and the classifier head.
- `attention`: Q K^T and softmax(.) V, `2 x heads x head_dim` MACs per (query, key) pair.
  `padded` counts the full padded square (a masked kernel computes it, causal or not); `useful`
  the pairs the unpadded rows need (a causal row of length n: n (n + 1) / 2).
- Not counted: embeddings (lookups), norms, activations, softmax, residuals, the value head
  (d per token), the sampler, and the LoRA branch (r (d_in + d_out) per token and target module:
  ~2-4% of a q or v projection at r 8-32, under 1% of a layer).

Generation decodes incrementally with a KV cache: per new token every layer's matmuls and LM
head run on one position, which attends to the cache (and, for T5, to the encoded prompt); the
prompt is encoded (T5) or prefilled (causal, logits of its last position only) once.

The update is forward + backward. Only the LoRA weights have gradients, so the backward of a
frozen weight matmul computes only the input gradient (1x its forward, not 2x); the attention
products have two activation operands each (2x). So update = 2x forward linear + 3x forward
attention (+ one more forward with gradient checkpointing), not the 3x of full fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stack:
    """A stack of identical transformer layers, widths in features.

    Attributes:
        layers: number of layers; d: hidden size; q: query and output width (heads x head_dim);
        kv: key and value width (kv_heads x head_dim: smaller than q under grouped-query
        attention); ff: feed-forward width; ff_mats: feed-forward matrices (3 gated, 2 plain);
        cross: each layer has a cross-attention over an encoder's output (T5's decoder).
    """

    layers: int
    d: int
    q: int
    kv: int
    ff: int
    ff_mats: int
    cross: bool = False

    @property
    def token_macs(self) -> int:
        """Weight MACs of one token through every layer (self-attention, cross q and o, feed-forward)."""
        per_layer = 2 * self.d * self.q + 2 * self.d * self.kv + self.ff_mats * self.d * self.ff
        return self.layers * (per_layer + (2 * self.d * self.q if self.cross else 0))

    @property
    def memory_macs(self) -> int:
        """Cross-attention k and v of one encoder token, every layer (0 without cross-attention)."""
        return self.layers * 2 * self.d * self.q if self.cross else 0

    @property
    def pair_macs(self) -> int:
        """Q K^T and A V of one (query, key) pair, every layer."""
        return self.layers * 2 * self.q


@dataclass(frozen=True)
class PolicyShape:
    """A policy's stacks: T5 (`encoder` and a `decoder` with cross-attention) or decoder-only (`encoder` None)."""

    decoder: Stack
    vocab: int
    encoder: Stack | None = None


@dataclass(frozen=True)
class ClassifierShape:
    """An encoder classifier (RoBERTa): the stack and a head of dense d x d then d x labels on the first token."""

    stack: Stack
    labels: int


@dataclass
class Part:
    """MACs of weight matmuls (`linear`) and attention products (`attention`), and the tokens fed."""

    linear: float = 0.0
    attention: float = 0.0
    tokens: float = 0.0

    def __add__(self, other: Part) -> Part:
        return Part(self.linear + other.linear, self.attention + other.attention, self.tokens + other.tokens)

    @property
    def flops(self) -> float:
        return 2.0 * (self.linear + self.attention)


@dataclass
class Work:
    """The same work counted without padding (`useful`) and as run, padding included (`padded`)."""

    useful: Part = field(default_factory=Part)
    padded: Part = field(default_factory=Part)

    def __add__(self, other: Work) -> Work:
        return Work(self.useful + other.useful, self.padded + other.padded)


def policy_shape(config) -> PolicyShape:
    """The stacks of a T5 (encoder-decoder) or Llama-like (decoder-only) transformers config."""
    kind = config.model_type
    if kind in ("t5", "mt5", "umt5"):
        q = config.num_heads * config.d_kv
        mats = 3 if getattr(config, "is_gated_act", False) else 2
        encoder = Stack(config.num_layers, config.d_model, q, q, config.d_ff, mats)
        decoder = Stack(config.num_decoder_layers or config.num_layers, config.d_model, q, q, config.d_ff, mats, cross=True)
        return PolicyShape(decoder=decoder, vocab=config.vocab_size, encoder=encoder)
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        stack = Stack(config.num_hidden_layers, config.hidden_size, config.num_attention_heads * head_dim,
                      kv_heads * head_dim, config.intermediate_size, 3)
        return PolicyShape(decoder=stack, vocab=config.vocab_size)
    raise ValueError(f"no FLOP count for model_type {kind!r} (t5 and llama-like policies are counted)")


def classifier_shape(config) -> ClassifierShape:
    """The stack and head of a RoBERTa/BERT-like sequence classifier config."""
    if config.model_type not in ("roberta", "xlm-roberta", "bert"):
        raise ValueError(f"no FLOP count for classifier model_type {config.model_type!r}")
    d = config.hidden_size
    return ClassifierShape(Stack(config.num_hidden_layers, d, d, d, config.intermediate_size, 2), config.num_labels)


def encoder_pass(stack: Stack, lengths: Sequence[int], width: int, causal: bool = False) -> Work:
    """One pass of `stack` over rows of `lengths` tokens padded to `width` (bidirectional or causal)."""
    tokens = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths) if causal else sum(n * n for n in lengths)
    rows = len(lengths)
    return Work(
        Part(tokens * stack.token_macs, pairs * stack.pair_macs, tokens),
        Part(rows * width * stack.token_macs, rows * width * width * stack.pair_macs, rows * width),
    )


def lm_head(d: int, vocab: int, rows_useful: int, rows_padded: int) -> Work:
    """The d x vocab projection over the given rows."""
    return Work(Part(rows_useful * d * vocab), Part(rows_padded * d * vocab))


def teacher_forced(
    shape: PolicyShape, prompts: Sequence[int], prompt_width: int, responses: Sequence[int], response_width: int
) -> Work:
    """One forward pass over prompts and responses (as `Architecture.forward` feeds them).

    Seq2seq: the encoder over the prompts, the decoder over the responses (causal self-attention,
    cross-attention to the prompt), the LM head at every decoder position. Causal: one sequence
    of prompt + response per row, the LM head at its last `response_width + 1` positions
    (`logits_to_keep`), of which a row's `responses[i]` are used.
    """
    rows = len(prompts)
    useful_head = sum(responses)
    if shape.encoder is None:
        work = encoder_pass(shape.decoder, [p + n for p, n in zip(prompts, responses, strict=True)],
                            prompt_width + response_width, causal=True)
        return work + lm_head(shape.decoder.d, shape.vocab, useful_head, rows * (response_width + 1))
    dec = shape.decoder
    work = encoder_pass(shape.encoder, prompts, prompt_width) + encoder_pass(dec, responses, response_width, causal=True)
    cross = Work(  # k, v of each encoder token; (decoder token, encoder token) pairs
        Part(sum(prompts) * dec.memory_macs, sum(n * p for n, p in zip(responses, prompts, strict=True)) * dec.pair_macs),
        Part(rows * prompt_width * dec.memory_macs, rows * response_width * prompt_width * dec.pair_macs),
    )
    return work + cross + lm_head(dec.d, shape.vocab, useful_head, rows * response_width)


def generate(shape: PolicyShape, prompts: Sequence[int], prompt_width: int, responses: Sequence[int], steps: int) -> Work:
    """Incremental decoding of `steps` tokens a row with a KV cache; row i's first `responses[i]` are useful.

    Seq2seq: the prompt encoded once; step s (1..steps) feeds token s-1 (the start token first),
    which attends to s cached positions and to the prompt; each row's cross-attention k and v
    are computed once. Causal: the prompt prefilled (causal attention, logits of its last
    position only: they give token 1); step s (1..steps-1) feeds token s, which attends to the
    prompt and s positions.
    """
    rows = len(prompts)
    dec, vocab = shape.decoder, shape.vocab
    step_macs = dec.token_macs + dec.d * vocab  # one position through every layer and the LM head

    def decoded(n: int) -> Part:  # n positions through every layer's weights and the LM head (pairs apart)
        return Part(n * step_macs, 0.0, n)

    if shape.encoder is not None:
        work = encoder_pass(shape.encoder, prompts, prompt_width)
        useful, padded = Part(), Part()
        for n, p in zip(responses, prompts, strict=True):  # steps 1..n: s self pairs + p cross pairs each
            useful += decoded(n) + Part(p * dec.memory_macs, (n * (n + 1) // 2 + n * p) * dec.pair_macs)
            padded += decoded(steps) + Part(
                prompt_width * dec.memory_macs, (steps * (steps + 1) // 2 + steps * prompt_width) * dec.pair_macs)
        return work + Work(useful, padded)
    # causal: the prefill's last position gives token 1 (head on one row), then steps 1..n-1
    work = encoder_pass(dec, prompts, prompt_width, causal=True) + lm_head(dec.d, vocab, rows, rows)
    useful, padded = Part(), Part()
    for n, p in zip(responses, prompts, strict=True):
        k, k_pad = max(n - 1, 0), max(steps - 1, 0)  # steps after the prefill; step s attends to p + s positions
        useful += decoded(k) + Part(0.0, (k * p + k * (k + 1) // 2) * dec.pair_macs)
        padded += decoded(k_pad) + Part(0.0, (k_pad * prompt_width + k_pad * (k_pad + 1) // 2) * dec.pair_macs)
    return work + Work(useful, padded)


def classify(shape: ClassifierShape, lengths: Sequence[int], width: int) -> Work:
    """One classifier forward over texts of `lengths` tokens padded to `width`, its head on each text's first token."""
    d, rows = shape.stack.d, len(lengths)
    head = (d * d + d * shape.labels) * rows
    return encoder_pass(shape.stack, lengths, width) + Work(Part(head), Part(head))


def backward(forward: Work) -> Work:
    """The backward of `forward` when only LoRA weights train: input gradients of the frozen weight
    matmuls (1x their forward) and both operands' gradients of the attention products (2x)."""
    def part(p: Part) -> Part:
        return Part(p.linear, 2.0 * p.attention, 0.0)

    return Work(part(forward.useful), part(forward.padded))


def update(forward: Work, recompute: bool = False) -> Work:
    """Forward + backward of a training pass; `recompute`: gradient checkpointing runs the forward once more."""
    again = Work(Part(forward.useful.linear, forward.useful.attention), Part(forward.padded.linear, forward.padded.attention))
    return forward + backward(forward) + (again if recompute else Work())
