"""labelgw.core.units: the one percentage parser the labels of traffic, canary and breaker share."""

from __future__ import annotations

import pytest

from labelgw.core.units import parse_percent


@pytest.mark.parametrize(("text", "percent"), [("5%", 5.0), ("5", 5.0), (" 12.5 %", 12.5), (".5%", 0.5), ("100", 100.0), ("0", 0.0)])
def test_percentages_as_labels_write_them(text: str, percent: float) -> None:
    assert parse_percent(text) == percent


@pytest.mark.parametrize("text", ["", "%", "-5", "+5", "five", "nan", "1e2", "5%%", "5 5"])
def test_anything_else_is_not_a_percentage(text: str) -> None:
    with pytest.raises(ValueError, match="not a percentage"):
        parse_percent(text)
