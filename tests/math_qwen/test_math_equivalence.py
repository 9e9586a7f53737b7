"""MATH answers: box extraction, Minerva normalization, sympy equivalence under a timeout."""

import time

import pytest

from math_qwen.math_equivalence import (
    LatexParseError,
    SympyWorker,
    extract_math_answer,
    is_equiv,
    last_boxed_only_string,
    latex_to_sympy,
    normalize_final_answer,
    remove_boxed,
    symbolic_equal,
)


class NoWorker:
    """Stands in for the sympy worker where the verdict must be reached without it."""

    def equal(self, a, b, timeout_seconds):
        raise AssertionError(f"sympy was asked about {a!r} and {b!r}")


@pytest.mark.parametrize(
    ("text", "boxed", "content"),
    [
        (r"so $\boxed{5}$.", r"\boxed{5}", "5"),
        (r"$\boxed{\frac{1}{\sqrt{2}}}$", r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{1} then \boxed{\{1, {2}\}}", r"\boxed{\{1, {2}\}}", r"\{1, {2}\}"),
        (r"\boxed{1\}", None, None),  # an escaped brace does not close the box
        (r"is $\boxed 7$.", r"\boxed 7", "7"),
        (r"\fbox{x+1} done", r"\fbox{x+1}", "x+1"),
        (r"\boxed{(1, 2", None, None),
        ("no box here", None, None),
    ],
)
def test_last_boxed_only_string_and_remove_boxed(text, boxed, content):
    assert last_boxed_only_string(text) == boxed
    assert remove_boxed(boxed) == content


def test_remove_boxed_rejects_what_is_not_a_box():
    assert remove_boxed("5") is None
    assert remove_boxed(None) is None


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        (r"x = \dfrac12", r"\frac{1}{2}"),
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        (r"\frac1{2}", r"\frac{1}{2}"),
        (r"\frac\pi2", r"\frac{\pi}{2}"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\sqrt[3]2", r"\sqrt[3]{2}"),
        (r"5\text{ cm}", "5"),
        (r"5\text{ cm}^2", "5"),
        (r"3\sqrt{2}\text{ units}", r"3\sqrt{2}"),
        ("12 inches", "12"),
        ("10 degrees", "10"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        (r"10\%", "10"),
        (r"\$1,000.", "1000"),
        (r"\$5.50", "5.5"),
        ("1,000,000", "1000000"),
        ("1,2", "1,2"),  # a list of solutions, not one thousand-separated number
        ("5.0", "5"),
        (".5", "0.5"),
        ("-3", "-3"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"\left\{1, 2\right\}", r"\{1,2\}"),
        (r"\text{(C)}", "(C)"),
        (r"\textbf{(C)}", "(C)"),
        (r"\text{Monday}", "Monday"),
        (r"1\text{ and }2", "1,2"),
        (r"5^{\text{th}}", "5"),
        (r"1,\!000", "1000"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"The value is $\frac{1}{2}$.", r"\frac{1}{2}"),
        ("y = 2x + 3", "2x+3"),
        (r"x \in [2, 5)", "[2,5)"),
        ("2a + b", "2a+b"),  # Minerva's "a " removal would leave "2+b"
        (r"\left| x \right|", "|x|"),  # Minerva's "ft" removal would leave "\le|x\right|"
        (r"0.\overline{3}", r"0.\overline{3}"),
        (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}"),
        ("\u03c0/2", r"\pi/2"),
        ("\u22125", "-5"),
    ],
)
def test_normalize_final_answer(raw, normalized):
    assert normalize_final_answer(raw) == normalized


EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\frac{1}{2}", r"\dfrac12"),
    ("0.5", "1/2"),
    (r"\dfrac12", "1/2"),
    (r"-\frac{1}{2}", "-0.5"),
    (r"\frac{-1}{2}", "-1/2"),
    ("5", r"5\text{ cm}"),
    ("5", "5 cm"),
    (r"\text{Monday}", "Monday"),
    (r"\text{(C)}", "(C)"),
    (r"90^\circ", "90"),
    ("90", "90 degrees"),
    (r"25\%", "25"),  # MATH writes percent answers with and without the sign
    (r"50\%", r"\frac{1}{2}"),  # and a percentage is its value
    (r"0.5\%", "0.005"),
    ("6", "6 cm^2"),  # a unit goes with its exponent
    ("6", r"6\text{ cm}^2"),
    ("-7", r"-7.0"),
    ("1,000", "1000"),
    ("x = 5", "5"),
    ("1,2", "2, 1"),  # "enter all the solutions, separated by commas": any order
    (r"\{1,2\}", r"\{2,1\}"),
    (r"[2,5)", r"x \in [2, 5)"),
    (r"(-\infty, 3] \cup (4, \infty)", r"(-\infty,3]\cup(4,\infty)"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\ \frac{4}{2}\end{pmatrix}"),
]
SYMBOLIC = [
    (r"\sqrt{8}", r"2\sqrt{2}"),
    (r"\frac{\sqrt{3}}{2}", r"\sin(\pi/3)"),
    (r"\sin^2 x + \cos^2 x", "1"),
    ("x^2+2x+1", "(x+1)^2"),
    ("2x+3", "3+2x"),
    (r"\frac{1+\sqrt{5}}{2}", r"\frac12+\frac{\sqrt5}{2}"),
    (r"\sqrt{3+2\sqrt{2}}", r"1+\sqrt{2}"),
    (r"\log_2 8", "3"),
    (r"\sqrt[3]{27}", "3"),
    (r"\binom{5}{2}", "10"),
    ("5!", "120"),
    ("|-3|", "3"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    (r"2\pi", r"\pi \cdot 2"),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
    ("3+4i", "4i+3"),
]
NOT_EQUIVALENT = [
    ("5", "-5"),
    ("36", "6 cm^2"),  # not 6^2: Minerva's normalization reads it so
    (r"\frac{1}{2}", r"0.5\%"),  # 0.5% is 0.005, not 0.5
    (r"\frac{1}{2}", r"5\%"),
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    ("0.333", r"\frac{1}{3}"),  # a rounded decimal is not the fraction
    ("1,2", "12"),
    ("1,2", "1,2,3"),
    ("(1,2)", "(2,1)"),  # tuples are ordered
    ("(2,5)", "[2,5)"),  # intervals differ in their brackets
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}2\\1\end{pmatrix}"),
    (r"\text{(C)}", "(D)"),
    (r"\text{Monday}", "Mondya"),  # words are not products of letters
    ("2x+3", "2x+4"),
    (r"\sqrt{8}", r"3\sqrt{2}"),
    (r"2\pi", "6.28"),
    ("90", r"\frac{\pi}{2}"),
    ("1/0", "2"),
    ("5", ""),
    ("5", None),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_equivalent_without_sympy(a, b):
    assert is_equiv(a, b, worker=NoWorker())
    assert is_equiv(b, a, worker=NoWorker())


@pytest.mark.parametrize(("a", "b"), SYMBOLIC)
def test_equivalent_by_sympy(a, b):
    assert is_equiv(a, b)
    assert is_equiv(b, a)


@pytest.mark.parametrize(("a", "b"), NOT_EQUIVALENT)
def test_not_equivalent(a, b):
    assert not is_equiv(a, b)
    assert not is_equiv(b, a)


@pytest.mark.parametrize(
    ("a", "b"), [("5", "6"), ("1,2", "1,3"), ("(1,2)", "(1,2,3)"), ("0.5", "1/3")]
)
def test_different_plain_numbers_are_decided_without_sympy(a, b):
    assert not is_equiv(a, b, worker=NoWorker())


def test_a_hanging_sympy_computation_is_not_equivalent_within_the_timeout():
    with SympyWorker() as worker:
        assert is_equiv(r"\sqrt{8}", r"2\sqrt{2}", worker=worker)  # started, warm
        start = time.monotonic()
        # sympy evaluates 2^(2^100) digit by digit: it never finishes.
        assert not is_equiv(r"2^{2^{100}}", "3", timeout_seconds=1.0, worker=worker)
        assert time.monotonic() - start < 3.0
        # The killed worker is replaced by the next request.
        assert is_equiv(r"\sqrt{12}", r"2\sqrt{3}", worker=worker)


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="timeout_seconds"):
        is_equiv("1", "1", timeout_seconds=0)


def test_symbolic_equal_never_raises():
    assert symbolic_equal(r"\frac{1}{0}", r"\frac{2}{0}") is False
    assert symbolic_equal(r"\unknown{x}", "x") is False


@pytest.mark.parametrize(
    ("latex", "expected"),
    [
        (r"\frac{1}{2}", "1/2"),
        (r"2\sqrt{2}", "2*sqrt(2)"),
        (r"x^{2}-1", "x**2 - 1"),
        (r"3 \cdot 4", "12"),
        (r"\pi r^2", "pi*r**2"),
        (r"-(1+2)", "-3"),
        ("0.25", "1/4"),
        (r"\frac{a_1}{2}", "a_1/2"),
    ],
)
def test_latex_to_sympy(latex, expected):
    import sympy

    assert sympy.simplify(latex_to_sympy(latex) - sympy.sympify(expected)) == 0


@pytest.mark.parametrize("latex", ["Monday", "1+", r"\foo{1}", "(1", ""])
def test_latex_to_sympy_rejects_what_it_cannot_read(latex):
    with pytest.raises(LatexParseError):
        latex_to_sympy(latex)


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("So x = 3.5.\nFinal Answer: The final answer is $3.5$. I hope it is correct.", "$3.5$"),
        (  # a reply that corrects itself: the last slot counts
            "Final Answer: The final answer is $7$. I hope it is correct.\nNo, 3+4 is not it.\n"
            "Final Answer: The final answer is $4$. I hope it is correct.",
            "$4$",
        ),
        ("The final answer is 3. I hope it is correct. No: the final answer is 4.", "4"),
        ("Final Answer: The final answer is 12", "12"),
        (r"First \boxed{1}, then \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        ("The answer is $5$.\nThe answer is 6.", "6"),
        ("We get $x = 2$, hence $y = 4$", "y = 4"),
        ("I do not know.", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_math_answer(completion, answer):
    assert extract_math_answer(completion) == answer
