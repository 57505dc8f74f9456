"""The benchmark's FLOP count (detox_lightning/bench/flops.py) against hand counts on tiny shapes,
and its linear part against the matmuls the real transformers models run."""

from types import SimpleNamespace

import pytest
import torch

from detox_lightning.bench import flops as F

# One-layer T5: d_model 8, 2 heads x d_kv 4 (q = 8), gated d_ff 16 (3 matrices), vocabulary 10.
T5 = SimpleNamespace(model_type="t5", num_heads=2, d_kv=4, d_model=8, d_ff=16, num_layers=1, num_decoder_layers=1,
                     is_gated_act=True, vocab_size=10)
# Two prompts of 3 and 2 tokens (padded to 3), responses of 2 and 1 tokens (padded to 2).
PROMPTS, P, RESPONSES, T = [3, 2], 3, [2, 1], 2


def macs(part: F.Part) -> float:
    return part.linear + part.attention


def test_t5_teacher_forced_pass_against_a_hand_count():
    work = F.teacher_forced(F.policy_shape(T5), PROMPTS, P, RESPONSES, T)
    enc_token = 4 * 8 * 8 + 3 * 8 * 16  # q, k, v, o + gated feed-forward = 256 + 384 = 640
    dec_token = enc_token + 2 * 8 * 8  # + cross-attention q, o = 768
    cross_kv = 2 * 8 * 8  # k, v of one encoder token = 128
    pair = 2 * 8  # Q K^T + A V per (query, key) pair = 16
    head = 8 * 10  # LM head per decoder position = 80
    useful = (
        5 * enc_token + (9 + 4) * pair  # encoder: 3 + 2 tokens; 3^2 + 2^2 pairs
        + 3 * dec_token + (3 + 1) * pair  # decoder: 2 + 1 tokens; causal pairs 2*3/2 + 1
        + 5 * cross_kv + (2 * 3 + 1 * 2) * pair  # cross: k, v of 5 prompt tokens; 2x3 + 1x2 pairs
        + 3 * head
    )
    padded = (
        6 * enc_token + 2 * 9 * pair  # 2 rows x 3; the full 3x3 squares
        + 4 * dec_token + 2 * 4 * pair  # 2 rows x 2; the full 2x2 squares (the causal mask runs on all of it)
        + 6 * cross_kv + 2 * 2 * 3 * pair
        + 4 * head
    )
    assert (useful, padded) == (6784, 8608)
    assert (macs(work.useful), macs(work.padded)) == (useful, padded)
    assert (work.useful.tokens, work.padded.tokens) == (5 + 3, 6 + 4)
    assert work.useful.flops == 2 * useful


def test_t5_generation_with_a_kv_cache_against_a_hand_count():
    work = F.generate(F.policy_shape(T5), PROMPTS, P, RESPONSES, steps=T)
    encoder_useful, encoder_padded = 5 * 640 + 13 * 16, 6 * 640 + 18 * 16
    step = 768 + 80  # one position through the decoder layer and the LM head
    # row 0 (prompt 3, 2 tokens): steps 1, 2 attend to 1, 2 cached positions and to 3 prompt tokens each
    row0 = 2 * step + (1 + 2) * 16 + 2 * 3 * 16 + 3 * 128
    row1 = 1 * step + 1 * 16 + 1 * 2 * 16 + 2 * 128  # prompt 2, 1 token
    padded_row = 2 * step + (1 + 2) * 16 + 2 * 3 * 16 + 3 * 128  # every row: 2 steps, prompt width 3
    assert macs(work.useful) == encoder_useful + row0 + row1 == 6784  # the same arithmetic as teacher forcing
    assert macs(work.padded) == encoder_padded + 2 * padded_row == 8576  # causal square not computed: 32 fewer
    assert work.padded.tokens == 6 + 4


LLAMA = SimpleNamespace(model_type="llama", hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                        intermediate_size=16, num_hidden_layers=1, vocab_size=10)


def test_llama_passes_against_a_hand_count():
    shape = F.policy_shape(LLAMA)
    token = 2 * 8 * 8 + 2 * 8 * 4 + 3 * 8 * 16  # q, o (8 wide); k, v (one kv head: 4 wide); SwiGLU = 576
    pair = 2 * 8
    work = F.teacher_forced(shape, PROMPTS, P, RESPONSES, T)
    # rows of 3 + 2 and 2 + 1 tokens, padded to 5; the LM head at the last T + 1 = 3 positions, 2 + 1 used
    assert macs(work.useful) == 8 * token + (15 + 6) * pair + 3 * 80
    assert macs(work.padded) == 10 * token + 2 * 25 * pair + 2 * 3 * 80
    gen = F.generate(shape, PROMPTS, P, RESPONSES, steps=T)
    # prefill 3 and 2 tokens (causal), the head on each row's last position; then row 0 one step over 3 + 1 positions
    assert macs(gen.useful) == 5 * token + (6 + 3) * pair + 2 * 80 + (token + 80) + 4 * pair
    assert macs(gen.padded) == 6 * token + 2 * 9 * pair + 2 * 80 + 2 * ((token + 80) + 4 * pair)


def test_classifier_and_update_against_a_hand_count():
    roberta = SimpleNamespace(model_type="roberta", hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=16, num_labels=2)
    work = F.classify(F.classifier_shape(roberta), [4, 2], 4)
    token, head = 4 * 64 + 2 * 8 * 16, 8 * 8 + 8 * 2  # plain feed-forward: 2 matrices; head on the first token
    assert macs(work.useful) == 6 * token + (16 + 4) * 16 + 2 * head
    assert macs(work.padded) == 8 * token + 2 * 16 * 16 + 2 * head
    fwd = F.Work(F.Part(100, 10, 5), F.Part(120, 20, 6))
    # LoRA-only gradients: frozen matmuls need only the input gradient (1x), attention products both (2x)
    upd = F.update(fwd)
    assert (upd.useful.linear, upd.useful.attention, upd.useful.tokens) == (200, 30, 5)
    assert (upd.padded.linear, upd.padded.attention) == (240, 60)
    again = F.update(fwd, recompute=True)  # gradient checkpointing: the forward once more
    assert (again.useful.linear, again.useful.attention) == (300, 40)


def linear_macs(model, run) -> int:
    """MACs of every nn.Linear the model runs in `run()`, counted by forward hooks."""
    total = []

    def hook(module, inputs, _):
        total.append(inputs[0].numel() // module.in_features * module.in_features * module.out_features)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sum(total)


@pytest.fixture
def batch():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return torch.tensor([[5, 6, 7], [5, 6, 0]]), mask


def test_linear_count_matches_the_matmuls_of_a_real_t5(batch):
    from transformers import T5Config, T5ForConditionalGeneration

    from detox_lightning.models.architectures import SEQ2SEQ

    torch.manual_seed(0)
    config = T5Config(vocab_size=10, d_model=8, d_kv=4, num_heads=2, d_ff=16, num_layers=1, num_decoder_layers=1,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config).eval()
    shape = F.policy_shape(config)
    ids, mask = batch
    responses = torch.tensor([[3, 4], [3, 0]])
    inputs = SEQ2SEQ.teacher_forced_inputs(config, ids, mask, responses, responses > 0)
    assert linear_macs(model, lambda: model(**inputs)) == F.teacher_forced(shape, [3, 2], 3, [2, 1], 2).padded.linear
    steps = 3
    run = lambda: model.generate(input_ids=ids, attention_mask=mask, min_length=steps + 1,
                                 max_new_tokens=steps, do_sample=False)
    assert linear_macs(model, run) == F.generate(shape, [3, 2], 3, [steps, steps], steps).padded.linear


def test_linear_count_matches_the_matmuls_of_a_real_llama(batch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from detox_lightning.models.architectures import CAUSAL

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=10, hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                         intermediate_size=16, num_hidden_layers=1, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = LlamaForCausalLM(config).eval()
    shape = F.policy_shape(config)
    ids, mask = batch
    ids, mask = ids.flip(1), mask.flip(1)  # left-padded, as causal prompts are
    responses = torch.tensor([[3, 4], [3, 4]])
    inputs = CAUSAL.teacher_forced_inputs(config, ids, mask, responses, torch.ones_like(responses))
    assert linear_macs(model, lambda: model(**inputs)) == F.teacher_forced(shape, [3, 2], 3, [2, 2], 2).padded.linear
    steps = 3
    run = lambda: model.generate(input_ids=ids, attention_mask=mask, min_new_tokens=steps,
                                 max_new_tokens=steps, do_sample=False)
    assert linear_macs(model, run) == F.generate(shape, [3, 2], 3, [steps, steps], steps).padded.linear


def test_unknown_model_types_are_refused():
    with pytest.raises(ValueError, match="gpt2"):
        F.policy_shape(SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match="t5"):
        F.classifier_shape(SimpleNamespace(model_type="t5"))
