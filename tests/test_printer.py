"""Printer: forms -> canonical text, the inverse of the reader."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ablauf_lang.errors import AblaufSyntaxError
from ablauf_lang.lang.forms import List, Map, Symbol, Vector
from ablauf_lang.lang.printer import print_form, print_forms
from ablauf_lang.lang.reader import read, read_one
from ablauf_lang.values import Keyword
from tests.strategies import forms, keyword_names, same_form, strings, symbol_names

K = Keyword
S = Symbol


def M(*flat: Any) -> Map:
    return Map(tuple(zip(flat[::2], flat[1::2], strict=True)))


PRINTS = [
    (None, "nil"),
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (-12, "-12"),
    (10**30, "1" + "0" * 30),
    (1.0, "1.0"),
    (-0.0, "-0.0"),
    (1.5e-7, "1.5e-07"),
    (1e16, "1e+16"),
    ("", '""'),
    ("plain", '"plain"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("a\nb\tc\rd", '"a\\nb\\tc\\rd"'),
    ("\x00\x1f\x7f", '"\\u0000\\u001f\\u007f"'),
    ("\ud83d", '"\\ud83d"'),
    ("é😀", '"é😀"'),
    (K("name"), ":name"),
    (K("ns/name"), ":ns/name"),
    (S("do!!"), "do!!"),
    (S("-"), "-"),
    (S("nil-safe"), "nil-safe"),
    (List(()), "()"),
    (Vector(()), "[]"),
    (Map(()), "{}"),
    (List((S("log!!"), K("a"))), "(log!! :a)"),
    (Vector((1, Vector((2, None)), "x")), '[1 [2 nil] "x"]'),
    (M(K("a"), 1, K("b"), Vector(())), "{:a 1 :b []}"),
]


@pytest.mark.parametrize(("form", "text"), PRINTS)
def test_print_form(form: Any, text: str) -> None:
    assert print_form(form) == text
    assert same_form(read_one(text), form)


UNPRINTABLE = [
    (S("nil"), "would not read back"),
    (S("1a"), "would not read back"),
    (S("-1"), "would not read back"),
    (S("a b"), "would not read back"),
    (S(""), "would not read back"),
    (K(""), "not a valid keyword"),
    (K(":a"), "not a valid keyword"),
    (K("a b"), "not a valid keyword"),
    (float("nan"), "no literal"),
    (float("inf"), "no literal"),
    (object(), "not an ablauf form"),
    ((1, 2), "not an ablauf form"),
]


@pytest.mark.parametrize(("form", "fragment"), UNPRINTABLE)
def test_unprintable_forms_are_refused(form: Any, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        print_form(Vector((form,)))


def test_print_forms_puts_one_form_per_line() -> None:
    text = print_forms([List((S("log!!"), 1)), K("k")])
    assert text == "(log!! 1)\n:k\n"
    assert [print_form(f) for f in read(text)] == ["(log!! 1)", ":k"]


def test_reading_canonical_text_and_printing_it_again_is_stable() -> None:
    source = '( do!! ,(log!! :a) ; c\n #_ x {:k [1 2.50 "\\u0041"]})'
    text = print_form(read_one(source))
    assert text == '(do!! (log!! :a) {:k [1 2.5 "A"]})'
    assert print_form(read_one(text)) == text


def test_deep_nesting_prints_without_recursion() -> None:
    depth = 2000
    text = "[" * depth + ":x" + "]" * depth
    form = read_one(text)
    assert print_form(form) == text


@given(forms)
def test_read_inverts_print(form: Any) -> None:
    assert same_form(read_one(print_form(form)), form)


@given(st.lists(forms, max_size=4))
def test_read_inverts_print_forms(items: list[Any]) -> None:
    back = read(print_forms(items))
    assert len(back) == len(items)
    assert all(map(same_form, back, items))


@given(symbol_names)
def test_symbols_read_back_as_symbols(name: str) -> None:
    form = read_one(print_form(Symbol(name)))
    assert type(form) is Symbol
    assert form.name == name


@given(st.text(alphabet="ab1-+.:#'!?/\\\"();, \n", min_size=1, max_size=6))
def test_printer_and_reader_agree_on_symbol_names(name: str) -> None:
    try:
        text = print_form(Symbol(name))
    except ValueError:
        try:
            back = read_one(name)
        except AblaufSyntaxError:
            return
        assert not (type(back) is Symbol and back.name == name)
        return
    assert text == name
    back = read_one(text)
    assert type(back) is Symbol
    assert back.name == name


@given(keyword_names)
def test_keywords_stay_keywords(name: str) -> None:
    form = read_one(print_form(Keyword(name)))
    assert type(form) is Keyword
    assert form == name


@given(strings)
def test_strings_stay_strings(text: str) -> None:
    form = read_one(print_form(text))
    assert type(form) is str
    assert form == text
