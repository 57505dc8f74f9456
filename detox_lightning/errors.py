"""The one exception type for bad user input (the CLI prints its message, not a traceback), and
helpers that check ranges and turn a library's error about user input into one."""

import contextlib
from collections.abc import Iterator


class ConfigError(ValueError):
    """A setting, file or model that cannot work; the message names the value and what was expected."""


def out_of_range(
    name: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """`"name=value must lie in [low, high]"` (open ends as parentheses) when `value` is outside, else None.

    None (an optional setting left unset) is never out of range; neither bound is needed.
    """
    if value is None:
        return None
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return None
    if high is None:
        return f"{name}={value} must be {'greater than' if low_open else 'at least'} {low}"
    if low is None:
        return f"{name}={value} must be {'less than' if high_open else 'at most'} {high}"
    return f"{name}={value} must lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def raise_problems(problems: list[str | None], prefix: str = "") -> None:
    """One ConfigError naming every problem (Nones skipped), or nothing."""
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(prefix + "; ".join(problems))


def one_line(err: BaseException, limit: int = 400) -> str:
    """An exception's message on one line (libraries' messages often span several), cut at `limit`."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def user_input(what: str) -> Iterator[None]:
    """Errors a library raises inside this block become one ConfigError: `"<what>: <its message>"`.

    Only around code that reads what the user named (a model path, a data file), where whatever
    fails is that input: transformers, peft and datasets raise OSError, ValueError, their own
    exception types and others, whose message says what went wrong but not which setting caused
    it; `what` names the setting and what was expected.
    """
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(f"{what} ({type(err).__name__}: {one_line(err)})") from err
