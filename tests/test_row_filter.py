"""`data.filter`: numeric and boolean comparisons on (nested) fields, and one error line for a bad one."""

import pytest

from detox_lightning.data.rows import RowFilter
from detox_lightning.errors import ConfigError

ROWS = [
    {"challenging": True, "prompt": {"toxicity": 0.8}},
    {"challenging": False, "prompt": {"toxicity": 0.1}},
    {"challenging": "true", "prompt": {"toxicity": None}},  # a string is not a boolean
    {"challenging": 1, "prompt": {}},  # nor is a number
    {"prompt": {"toxicity": 0.5}},  # missing
]


@pytest.mark.parametrize(
    "text, kept",
    [
        ("challenging == true", [0]),
        ("challenging==false", [1]),
        ("challenging != true", [1]),
        ("challenging == True", [0]),
        ("prompt.toxicity > 0.3", [0, 4]),
        ("prompt.toxicity <= 0.5", [1, 4]),
        ("challenging == 1", [0, 3]),  # a number compares with booleans as 0 and 1, as Python does
    ],
)
def test_filter_keeps_the_rows_that_satisfy_it(text, kept):
    row_filter = RowFilter.parse(text)
    assert [i for i, row in enumerate(ROWS) if row_filter(row)] == kept


def test_filter_prints_as_it_parses():
    assert str(RowFilter.parse(" challenging==TRUE ")) == "challenging == true"
    assert str(RowFilter.parse("prompt.toxicity > 0.30")) == "prompt.toxicity > 0.3"


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt.toxicity is high", ("data.filter='prompt.toxicity is high' is not of the form '<field> <op> <number>' "
                                     "(op one of > >= < <= == !=) or '<field> == true|false' (or !=)")),
        ("challenging == yes", "data.filter='challenging == yes' is not of the form '<field> <op> <number>'"),
        ("prompt.toxicity > 1.2.3", "data.filter='prompt.toxicity > 1.2.3': '1.2.3' is not a number"),
        ("challenging > true", ("data.filter='challenging > true': true and false compare with == or != only, "
                                "e.g. 'challenging == true'")),
    ],
)
def test_a_bad_filter_is_one_error_line_naming_it(text, message):
    with pytest.raises(ConfigError) as info:
        RowFilter.parse(text)
    assert message in str(info.value) and "\n" not in str(info.value)
