"""Prompts and rule grading: letter extraction, normalisation, numbers, forms, chance rates."""

from __future__ import annotations

import pytest

from zoomless.eval.grading import Grade, extract_letter, grade, normalize, numbers_in, parse_number
from zoomless.eval.metrics import by_dimension
from zoomless.prompts import MCQ_SUFFIX, OPEN_SUFFIX, format_question, gold_letter, n_options, sample_form
from zoomless.sample import Sample
from zoomless.world import DIMENSIONS, plan_sample


def mcq(answer="red", options=("blue", "red", "green", "dark red"), q="What colour is the car?", **kw) -> Sample:
    return Sample(id="m", image="x.png", question=q, answer=answer, options=options, **kw)


def open_q(answer: str, q: str = "How many dots?") -> Sample:
    return Sample(id="o", image="x.png", question=q, answer=answer)


def zoomworld(n: int = 60) -> list[Sample]:
    return [plan_sample(i, split="test", seed=0)[1] for i in range(n)]


# ----------------------------------------------------------------------------- prompts


def test_format_question_mcq_and_open():
    s = mcq()
    assert format_question(s, form="mcq") == (
        "What colour is the car?\nA. blue\nB. red\nC. green\nD. dark red\n" + MCQ_SUFFIX
    )
    assert format_question(s, form="open") == "What colour is the car?\n" + OPEN_SUFFIX
    # the overlay view's question text replaces the sample's
    assert format_question(s, "Look at the box. What colour?", "open").startswith("Look at the box. What colour?\n")


def test_public_mcq_with_options_in_text_is_left_as_is():
    q = "What is the colour of the cup?\n(A) red\n(B) blue\n(C) white\nAnswer with the option's letter."
    s = Sample(id="v", image="x.png", question=q, answer="B")
    assert gold_letter(s) == "B" and n_options(s) == 3
    assert sample_form(s, "mcq") == "mcq" and sample_form(s, "open") == "mcq"
    assert format_question(s, form="mcq") == q
    assert gold_letter(Sample(id="w", image="x.png", question=q, answer="(b)")) == "B"  # MMVP style


def test_sample_form_is_open_without_options():
    assert sample_form(open_q("3"), "mcq") == "open"
    assert sample_form(mcq(), "mcq") == "mcq"
    # an open question whose answer happens to be a letter is not MCQ: no options in the text
    assert sample_form(open_q("A", q="Which letter is on the sign?"), "mcq") == "open"
    with pytest.raises(ValueError, match="form"):
        sample_form(mcq(), "essay")


# ----------------------------------------------------------------------------- letters

OPTS = ["blue", "red", "green", "dark red"]

LETTER_CASES = [
    ("(B)", "B"),
    ("B.", "B"),
    ("B", "B"),
    ("b", "B"),
    ("Answer: B", "B"),
    ("the answer is b", "B"),
    ("**B**", "B"),
    ("<answer>B</answer>", "B"),
    ("<answer> C ", "C"),  # no closing tag: nothing is cut off
    ("\\boxed{B}", "B"),
    ("The answer is \\boxed{\\text{C}}.", "C"),
    ("<think>A or B? maybe A</think><answer>C</answer>", "C"),
    ("B. red", "B"),
    ("(C) green", "C"),
    ("C) green", "C"),
    ("I think B", "B"),
    ("I choose A.", "A"),
    ("Option D", "D"),
    ("The answer is A because it is blue", "A"),
    ("The correct option is C", "C"),
    ("I would pick (C) here", "C"),
    ("green", "C"),
    ("Green.", "C"),
    ("dark red", "D"),  # contains "red" too, but the longer option wins
    ("a dark red one", "D"),
    ("I don't know", None),
    ("", None),
    ("D.C. is a city", None),
    ("A or C, hard to tell", None),
    ("It is (A) or (C)", None),
]


@pytest.mark.parametrize("text,expected", LETTER_CASES)
def test_extract_letter(text, expected):
    assert extract_letter(text, 4, OPTS) == expected


@pytest.mark.parametrize(
    "text,options,expected",
    [
        # the reference's bug: "A red car" chose A; a capital article is not a letter
        ("A red car", None, None),
        ("A red car", ["blue car", "red car", "green car"], "B"),
        ("A red car", ["blue", "red"], "B"),
        ("Answer: A red car", ["red car", "blue car"], "A"),  # here the option text itself is A
        ("I think it is blue", None, None),
        ("It is a cat", ["dog", "cat"], "B"),
        ("E", None, None),  # beyond the 4 options offered
        ("<answer>red</answer>", ["blue", "red"], "B"),
    ],
)
def test_extract_letter_ignores_capitals_in_sentences(text, options, expected):
    assert extract_letter(text, 4, options) == expected


# ----------------------------------------------------------------------------- normalisation, numbers


def test_normalize():
    assert normalize("  The Red, car! ") == "red car"
    assert normalize("An apple.") == "apple"
    assert normalize("A") == "a"  # an answer that is only a letter keeps it
    assert normalize("1,000.50 m") == "1000.50 m"
    assert normalize("T-shirt") == normalize("t shirt")


@pytest.mark.parametrize(
    "text,value",
    [("3", 3), ("three", 3), ("Three.", 3), ("twenty-one", 21), ("one hundred and five", 105),
     ("3.50", 3.5), ("1,000", 1000), ("none", 0), ("Zero", 0), ("3 cars", None), ("red", None)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_numbers_in():
    assert numbers_in("There are three dots and 4 squares") == [3, 4]
    assert numbers_in("7 dots, 7 in all") == [7]


@pytest.mark.parametrize(
    "gold,pred,correct,method",
    [
        ("3", "three", True, "number"),
        ("3", "Three.", True, "number"),
        ("three", "3", True, "number"),
        ("3", "There are 3 dots.", True, "number"),
        ("3", "4", False, "number"),
        ("3", "3 or 4", False, "unparsable"),
        ("3", "many", False, "unparsable"),
        ("red car", "A red car.", True, "exact"),
        ("red", "Blue", False, "exact"),
        ("yes", "Yes, it is.", True, "exact"),
        ("no", "Yes.", False, "exact"),
        ("no", "maybe", False, "unparsable"),
        ("7ERK", "7erk", True, "exact"),
        ("3", "", False, "unparsable"),
        ("red", "<answer>Red</answer>", True, "exact"),
    ],
)
def test_grade_open(gold, pred, correct, method):
    g = grade(open_q(gold), pred, "open")
    assert (g.correct, g.method) == (correct, method)


def test_grade_open_with_known_options_reads_the_named_option():
    s = mcq(answer="red", options=("blue", "red", "green"))
    assert grade(s, "It looks red to me", "open") == Grade(True, "red", "exact")
    assert grade(s, "It looks green to me", "open").correct is False


def test_grade_mcq_and_failures():
    s = mcq()
    assert grade(s, "B", "mcq") == Grade(True, "B", "letter")
    assert grade(s, "A", "mcq") == Grade(False, "A", "letter")
    assert grade(s, "no idea", "mcq") == Grade(False, None, "unparsable")
    assert grade(s, "", "mcq", error="timeout") == Grade(False, None, "error")
    assert grade(s, None, "mcq") == Grade(False, None, "error")
    embedded = Sample(id="v", image="x.png", question="Colour?\n(A) red\n(B) blue", answer="(b)")
    assert grade(embedded, "The answer is (B).", "mcq").correct
    assert grade(embedded, "The answer is (B).", "open").correct  # letter-gold rows stay MCQ
    with pytest.raises(ValueError, match="no gold"):
        grade(Sample(id="n", image="x.png", question="q"), "B", "mcq")


# ----------------------------------------------------------------------------- whole sets


def test_gold_answers_grade_perfectly_on_zoomworld_and_hand_built():
    samples = zoomworld(60)
    assert {s.dimension for s in samples} == set(DIMENSIONS)
    for s in samples:
        assert grade(s, s.answer_letter, "mcq").correct, s
        assert grade(s, f"The answer is {s.answer_letter}.", "mcq").correct, s
        assert grade(s, s.answer, "mcq").correct, s  # writing the option text
        assert grade(s, s.answer, "open").correct, s
    hand = [open_q("3"), open_q("twelve"), open_q("yes", "Is it red?"), open_q("Stop sign", "What sign?"), mcq()]
    for s in hand:
        assert grade(s, s.answer, "open").correct, s
        assert grade(s, s.answer, "mcq").correct, s


def test_constant_answer_scores_the_share_of_gold_A_per_dimension():
    samples = zoomworld(90)
    correct = [grade(s, "A", "mcq").correct for s in samples]
    got = by_dimension(correct, [s.dimension for s in samples])
    for dim in DIMENSIONS:
        group = [s for s in samples if s.dimension == dim]
        share = sum(s.answer_letter == "A" for s in group) / len(group)
        assert got[dim].acc == pytest.approx(share)
        assert got[dim].n == len(group) == 15
    assert got["all"].acc == pytest.approx(sum(s.answer_letter == "A" for s in samples) / len(samples))
    # and the open form never credits a bare "A"
    assert not any(grade(s, "A", "open").correct for s in samples)
