"""kernel/text.py: what callers write, read as values, refused with EINVAL when no
value can be made of it (found by tests/test_fuzz_files.py as bugs further in)."""

from __future__ import annotations

import errno

import pytest

from kernel.errors import KernelError
from kernel.text import MAX_ID, decimal, loads


def test_decimal_takes_ascii_numbers_that_fit_the_journal():
    assert decimal("42") == 42 and decimal(str(MAX_ID)) == MAX_ID
    for bad in ("", "-1", "4 2", "0x10", "²", "٣", str(MAX_ID + 1), "9" * 40):
        assert decimal(bad) is None, bad


def test_loads_refuses_half_a_surrogate_pair_and_keeps_whole_ones():
    assert loads('{"a": "\\ud83d\\ude00"}', "x") == {"a": "\U0001f600"}
    for bad in ('"\\ud800"', '{"k": ["\\udfff"]}', '{"\\ud800": 1}'):
        with pytest.raises(KernelError) as info:
            loads(bad, "the thing")
        assert info.value.errno == errno.EINVAL and "the thing" in info.value.message
    with pytest.raises(ValueError):
        loads("{not json", "x")
