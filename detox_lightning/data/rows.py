"""Reading prompt datasets' rows: nested fields (`prompt.text`) and filters on a numeric or boolean field
(`prompt.toxicity > 0.3`, `challenging == true`)."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass

from detox_lightning.errors import ConfigError

OPERATORS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}
_FILTER = re.compile(r"^\s*([\w.]+)\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+|true|false)\s*$", re.IGNORECASE)
_BOOLEANS = {"true": True, "false": False}


def get_field(row: dict, field: str):
    """`row["prompt"]["text"]` for `prompt.text`; None where a level is missing."""
    value = row
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:  # datasets hands `map` a lazy Mapping
            return None
        value = value[part]
    return value


def check_field(columns: list[str], features, field: str, flag: str) -> None:
    """Raise a ConfigError listing the columns unless `field` (dotted) names one of the dataset's fields."""
    top, *rest = field.split(".")
    if top not in columns:
        raise ConfigError(f"{flag}={field!r}: the data has no column {top!r}; its columns are {columns}")
    feature = features[top]
    for part in rest:
        if not isinstance(feature, dict) or part not in feature:
            inner = sorted(feature) if isinstance(feature, dict) else []
            raise ConfigError(f"{flag}={field!r}: column {top!r} has no field {part!r}; its fields are {inner}")
        feature = feature[part]


@dataclass(frozen=True)
class RowFilter:
    """`<field> <op> <number>` or `<field> == true|false`: keeps rows whose (nested) field satisfies it.

    A number compares with numbers (and with booleans as 0 and 1, as Python does); true or false
    matches real booleans only, so a string "true" or a 1 is not taken for one: RealToxicityPrompts'
    `challenging` is a JSON boolean. Missing values fail either way.
    """

    field: str
    op: str
    value: float | bool

    @classmethod
    def parse(cls, text: str) -> RowFilter:
        match = _FILTER.match(text)
        if not match:
            raise ConfigError(
                f"data.filter={text!r} is not of the form '<field> <op> <number>' (op one of {' '.join(OPERATORS)}) "
                f"or '<field> == true|false' (or !=), e.g. 'prompt.toxicity > 0.3' or 'challenging == true'"
            )
        field, op, number = match.groups()
        if number.lower() in _BOOLEANS:
            if op not in ("==", "!="):
                raise ConfigError(
                    f"data.filter={text!r}: true and false compare with == or != only, e.g. '{field} == {number.lower()}'"
                )
            return cls(field, op, _BOOLEANS[number.lower()])
        try:
            value = float(number)
        except ValueError:
            raise ConfigError(f"data.filter={text!r}: {number!r} is not a number") from None
        return cls(field, op, value)

    def __call__(self, row: dict) -> bool:
        value = get_field(row, self.field)
        if isinstance(self.value, bool):
            return isinstance(value, bool) and OPERATORS[self.op](value, self.value)
        if value is None or isinstance(value, (str, bytes, Mapping, list)):
            return False
        value = float(value)
        return not math.isnan(value) and OPERATORS[self.op](value, self.value)

    def __str__(self) -> str:
        value = str(self.value).lower() if isinstance(self.value, bool) else f"{self.value:g}"
        return f"{self.field} {self.op} {value}"
