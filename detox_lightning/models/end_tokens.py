"""Which token ids end a response.

A tokenizer names one EOS, but chat models end an assistant turn with a token of their own (Qwen's
`<|im_end|>`, Llama 3's `<|eot_id|>`) and list several ids in `generation_config.eos_token_id`.
With the tokenizer's EOS alone they would generate to the cap every time, and the response mask,
the missing-EOS penalty, the monitor's EOS rate and the SFT targets would all miss the real end.
"""

from __future__ import annotations

from collections.abc import Sequence


def end_token_ids(generation_config, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's (an int or a list) and the tokenizer's EOS."""
    configured = getattr(generation_config, "eos_token_id", None)
    candidates = [configured] if isinstance(configured, int) else list(configured or [])
    ids: list[int] = []
    for token in [*candidates, tokenizer.eos_token_id]:
        if token is not None and int(token) not in ids:
            ids.append(int(token))
    return ids


def turn_end_id(tokenizer, end_ids: Sequence[int]) -> int:
    """The end id that closes an assistant turn, which supervised targets must end with.

    With a chat template: the last end id in a rendered exchange (the template writes it after the
    assistant's text). Without one, or a template that writes no end id: the tokenizer's EOS.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=True)
        ids = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
        for token in reversed(list(ids)):
            if token in end_ids:
                return int(token)
    return tokenizer.eos_token_id
