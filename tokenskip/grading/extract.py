"""Answer extraction: the final answer a response states, and where its answer tail starts.

* :func:`extract_answer` - the final answer a response states (last ``\\boxed{}``/``\\fbox{}``,
  "The final answer is ...", GSM8K ``#### N``, "the answer is ..."; optionally the last number).
* :func:`split_answer_tail` - ``cot`` -> ``(reasoning, answer_tail)``; the compression stage prunes
  only the reasoning, so the stated answer survives every compression ratio.
* :func:`find_last_boxed` - THE ``\\boxed{}`` parser: grading reads responses with it and
  :mod:`tokenskip.sources` reads gold answers out of MATH solutions with it, so both agree on what
  a box holds.

Extraction priority (the same one decides where the answer tail starts): the last well-formed
``\\boxed{}``; else the later of the last "final answer is/:" and the last GSM8K ``#### N``; else
the last "answer is/:"; else (only with ``last_number_fallback``) the last number in the text.
"""

from __future__ import annotations

import re

BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_ARGUMENT = re.compile(r"[^\s$]+")
# "final answer is", "Final Answer:", "**Final Answer:**"; "final answer is" is an explicit statement.
_FINAL_ANSWER = re.compile(r"final\s+answer(?:\*\*)?\s*(?:is\b|:)", re.IGNORECASE)
# GSM8K's "#### 18". Markdown "#### Step 2" headings (common in model output) are not answers.
_HASHES = re.compile(r"(?<!#)####(?!#)[ \t]*(?=[-+$\\.\d(])")
# The weakest explicit marker: "the answer is 5", "Answer: 5".
_ANSWER_IS = re.compile(r"\banswer(?:\*\*)?\s*(?:is\b|:)", re.IGNORECASE)
# A number, for the last-number fallback: 1,234.5 / -3 / .5; never starts inside another number.
_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?|(?<![\d.])-?\.\d+")
# Where a free-text answer after a marker ends: a sentence end (a "." followed by a space or the
# end, so "3.5" survives), or a model's "I hope it is correct" sign-off.
_SENTENCE_END = re.compile(r"[.?!](?=\s|$)|\sI hope\b", re.IGNORECASE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
# Longest prefix taken into an answer tail before the marker when looking for a statement start:
# bounds the tail when the answer sits at the end of one long unpunctuated paragraph.
_MAX_LEAD_IN = 200


def match_brace(text: str, open_pos: int, limit: int | None = None) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_pos`` before ``limit`` (escapes skipped)."""
    depth = 0
    i = open_pos
    n = len(text) if limit is None else limit
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_content(text: str, end: int, limit: int) -> tuple[str | None, bool]:
    """(argument, closed) of the ``\\boxed`` command name ending at ``end``.

    The argument is None when it is empty or never closes before ``limit``; ``closed`` says
    whether a brace argument closed (see :func:`find_last_boxed`).
    """
    i = end
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        close = match_brace(text, i, limit)
        if close is None:  # truncated generation: the box never closes
            return None, False
        return text[i + 1 : close].strip() or None, True
    # "\boxed 5" (no braces): one token up to whitespace or a closing "$".
    m = _BARE_ARGUMENT.match(text, i)
    if i == end or m is None:
        return None, True
    return m.group(0).strip() or None, True


def find_last_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the last well-formed non-empty ``\\boxed``/``\\fbox``, or None.

    The content is the brace argument with nested braces (escaped ``\\{``/``\\}`` never open or
    close one), stripped; or, brace-less (``\\boxed 5``), the one token up to whitespace or ``$``.
    Empty boxes and boxes whose brace never closes (a truncated generation) are skipped in favour
    of an earlier one.
    """
    # A box that never closes leaves every earlier box unclosed past its start too (their depth
    # only grows there), so earlier boxes are matched only up to it: linear, not quadratic, on
    # "\boxed{\boxed{\boxed{..." garbage.
    limit = len(text)
    for m in reversed(list(BOXED_COMMAND.finditer(text))):
        content, closed = _boxed_content(text, m.end(), limit)
        if content is not None:
            return m.start(), content
        if not closed:
            limit = m.start()
    return None


def _strip_answer(s: str) -> str:
    """Drop markdown bold, colons, blanks and full stops around a free-text answer."""
    # Index scans, not regexes: "(\*\*|\s)+$" backtracks quadratically on long blank runs.
    i, j = 0, len(s)
    while i < j:
        if s[i].isspace() or s[i] == ":":
            i += 1
        elif s.startswith("**", i):
            i += 2
        else:
            break
    while j > i:
        if s[j - 1].isspace():
            j -= 1
        elif j - 2 >= i and s.startswith("**", j - 2):
            j -= 2
        else:
            break
    return s[i:j].rstrip(".").strip()


def _answer_after(text: str, pos: int) -> tuple[str, int] | None:
    """(answer, end position) of the free-text answer right after a marker ending at ``pos``."""
    n = len(text)
    i = pos
    while i < n and text[i] in " \t:*":
        i += 1
    if i < n and text[i] == "\n":  # "The final answer is:\n\n$$ 18 $$" - the answer is on a later line
        while i < n and text[i] in " \t\n":
            i += 1
    # A math span right after the marker is the answer, whole (it may contain ". " or newlines).
    for opener, closer in (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$")):
        if text.startswith(opener, i):
            close = text.find(closer, i + len(opener))
            if close != -1:
                inner = text[i + len(opener) : close].strip()
                boxed = find_last_boxed(inner)
                answer = _strip_answer(boxed[1] if boxed else inner)
                return (answer, close + len(closer)) if answer else None
            break
    line_end = text.find("\n", i)
    line_end = n if line_end == -1 else line_end
    end = _SENTENCE_END.search(text, i, line_end)
    answer_end = line_end if end is None else end.start()
    answer = _strip_answer(text[i:answer_end])
    return (answer, answer_end) if answer else None


def _is_final_statement(text: str, end: int) -> bool:
    """No new paragraph after ``end``: "maybe the answer is 80?\n\nWait, ..." is not a final answer."""
    return _PARAGRAPH_BREAK.search(text[end:].rstrip()) is None


def _locate_answer(text: str) -> tuple[int, str] | None:
    """(marker position, answer) of the explicitly stated final answer, by the module's priority."""
    boxed = find_last_boxed(text)
    if boxed is not None:
        return boxed
    strong = []
    for pattern in (_FINAL_ANSWER, _HASHES):
        last = None
        for m in pattern.finditer(text):
            last = m
        if last is not None:
            found = _answer_after(text, last.end())
            if found is not None:
                strong.append((last.start(), found[0]))
    if strong:
        return max(strong)
    # "the answer is" is also how models think aloud, so it only counts in the last paragraph.
    for m in reversed(list(_ANSWER_IS.finditer(text))):
        found = _answer_after(text, m.end())
        if found is not None:
            return (m.start(), found[0]) if _is_final_statement(text, found[1]) else None
    return None


def extract_answer(text: str, *, last_number_fallback: bool = False) -> str | None:
    """The final answer stated in ``text``, or None when there is none.

    ``last_number_fallback`` (off by default) returns the last number in the text when no explicit
    final answer is stated. Keep it off for training data (a sample that never states its answer is
    ``unparsable`` and must not teach the model to trail off); turn it on for TokenSkip-compatible
    evaluation, whose scorer does the same.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
    located = _locate_answer(text)
    if located is not None:
        return located[1]
    if last_number_fallback:
        last = None
        for m in _NUMBER.finditer(text):
            last = m
        if last is not None:
            return last.group(0).replace(",", "")
    return None


# ---------------------------------------------------------------------------------------------
# Answer tail
# ---------------------------------------------------------------------------------------------

_DISPLAY_OPENER = re.compile(r"(?:\\\[|\$\$|\\begin\{[A-Za-z*]+\})")
_SENTENCE_BREAK = re.compile(r"[.!?](?=\s)")


def _line_start(text: str, pos: int) -> int:
    return text.rfind("\n", 0, pos) + 1


def _statement_start(text: str, pos: int) -> int:
    """Start of the sentence (within its line) holding ``pos``; at most ``_MAX_LEAD_IN`` before it."""
    line_start = _line_start(text, pos)
    start = line_start
    for m in _SENTENCE_BREAK.finditer(text, line_start, pos):
        start = m.end()
    while start < pos and text[start] in " \t":
        start += 1
    if pos - start > _MAX_LEAD_IN:
        return pos
    return start


def _previous_line(text: str, start: int) -> tuple[int, str] | None:
    """(start, content) of the last non-blank line before the line starting at ``start``."""
    end = start - 1
    while end >= 0:
        ls = text.rfind("\n", 0, end) + 1
        line = text[ls:end]
        if line.strip():
            return ls, line
        end = ls - 1
    return None


def _lead_in_start(text: str, start: int) -> int:
    """Pull the tail's start back over the lines that introduce the answer.

    "Thus, the final answer is:\\n\\[\\n\\boxed{5}\\n\\]" is one statement: the display-math opener
    and a line ending in ":" (or a "Final Answer" heading) right above the answer belong to it.
    """
    for _ in range(3):
        if start != _line_start(text, start):
            break  # the statement starts mid-line: nothing above belongs to it
        prev = _previous_line(text, start)
        if prev is None:
            break
        prev_start, line = prev
        stripped = line.strip().strip("*#").strip()
        if _DISPLAY_OPENER.fullmatch(line.strip()):
            start = prev_start
        elif stripped.endswith(":") or (stripped.lower().startswith("final answer") and len(stripped) < 40):
            start = _statement_start(text, prev_start + len(line.rstrip()) - 1)
        else:
            break
    return start


def split_answer_tail(cot: str) -> tuple[str, str]:
    """Split a CoT into ``(reasoning, answer_tail)`` with ``reasoning + answer_tail == cot``.

    The tail is the final-answer statement to the end of the text: it starts at the sentence (or
    line) holding the answer that :func:`extract_answer` returns without the last-number fallback
    - the last ``\\boxed{}``, else the last "The final answer is"/``#### N``, else the last "the
    answer is" - pulled back over a display-math opener or a "...:"/"Final Answer" line right
    above it. Compression prunes only the reasoning, so the stated answer is never pruned.

    A CoT that states no final answer returns ``(cot, "")``: all of it is reasoning. (Such a CoT
    grades ``unparsable`` and never reaches compression in the training path.)
    """
    if not isinstance(cot, str):
        raise TypeError(f"split_answer_tail expects a str, got {type(cot).__name__}")
    located = _locate_answer(cot)
    if located is None:
        return cot, ""
    start = _lead_in_start(cot, _statement_start(cot, located[0]))
    return cot[:start], cot[start:]
