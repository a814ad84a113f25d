"""Answer normalisation: the canonical text a stated or gold answer is compared as.

:func:`normalise_answer` runs on both sides before verification; :func:`same_answer` is the fast
path's certain equality (identical text or the same plain number), which spares math-verify most
GSM8K answers.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from tokenskip.grading.extract import BOXED_COMMAND, match_brace

_MATH_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# "18 dollars", "5 apples", "18 \text{ dollars}", "10\mbox{ cm}": a number followed only by a unit.
# A plain-word unit needs a space and two letters, so "2x" and "3 i" stay expressions.
_NUMBER_WITH_UNIT = re.compile(
    r"(?P<num>[-+]?[\d.,]*\d)"
    r"(?:\s*\\(?:text|mbox|mathrm|textbf)\{\s*[A-Za-z][A-Za-z .]*\}|\s+[A-Za-z]{2,}[A-Za-z .]*)"
)


def normalise_answer(answer: str) -> str:
    """Canonical text of a stated or gold answer (both sides are normalised the same way).

    Removes math delimiters and an enclosing ``\\boxed{}``, LaTeX spacing (``\\!``, ``\\,``,
    ``{,}``), currency signs, ``\\dfrac``/``\\tfrac``, a trailing full stop, thousands separators of
    a plain number and a plain-word unit after a number. Everything else (percent, ``\\text{}``,
    degrees, sets, intervals) is left to math-verify, which knows those equivalences.
    """
    s = answer.strip()
    for _ in range(4):  # peel "$\boxed{ 18 }$" layer by layer
        before = s
        for opener, closer in _MATH_WRAPPERS:
            if len(s) >= len(opener) + len(closer) and s.startswith(opener) and s.endswith(closer):
                s = s[len(opener) : -len(closer)].strip()
                break
        m = BOXED_COMMAND.match(s)
        if m is not None:
            brace = m.end()
            while brace < len(s) and s[brace] in " \t":
                brace += 1
            if brace < len(s) and s[brace] == "{" and match_brace(s, brace) == len(s) - 1:
                s = s[brace + 1 : -1].strip()
        if s == before:
            break
    # MATH writes big numbers "11,\! 111,\! 100": drop the spacing so the thousands commas are seen.
    s = re.sub(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))", ",", s)
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"(?<=\d)\\[,;: ](?=\d{3})", "", s)  # "1\,000" thin-space thousands separator
    s = re.sub(r"^([-+]?)\\?\$\s*", r"\1", s)  # "$18", "\$18", "-$5"
    s = s.strip()
    if s.endswith(".") and not s.endswith(".."):  # "18." - but keep an ellipsis
        s = s[:-1].rstrip()
    unit = _NUMBER_WITH_UNIT.fullmatch(s)
    if unit is not None:
        s = unit.group("num")
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def _plain_number(s: str) -> Decimal | None:
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None


def same_answer(pred: str, gold: str) -> bool:
    """Cheap certain equality of two normalised answers: identical text or the same plain number."""
    if pred == gold:
        return True
    a, b = _plain_number(pred), _plain_number(gold)
    return a is not None and b is not None and a == b
