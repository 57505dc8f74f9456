"""Reward functions the tests name by path (`reward_fns:...`; tests/ is on PYTHONPATH in CLI runs)."""


def longer_is_better(queries, responses):
    return [float(len(r.split())) for r in responses]


def toxicity_of_idiot(queries, responses):
    return [1.0 if "idiot" in (q + r) else 0.0 for q, r in zip(queries, responses, strict=True)]


def one_score_too_few(queries, responses):
    return [0.0] * (len(responses) - 1)


NOT_A_FUNCTION = 3


def pays_for_dollars(queries, responses):
    """A gameable reward: 3 per 'dollars' in the response (a word the SFT model writes in some summaries)."""
    return [3.0 * r.count("dollars") for r in responses]


def flags_dollars(queries, responses):
    """A judge that calls any response with 'dollars' toxic: what the gameable reward pays for."""
    return [1.0 if "dollars" in r else 0.0 for r in responses]
