"""Grading: final-answer extraction, answer/tail splitting and verification against the gold answer.

Three jobs, used by generation filtering, compression and evaluation alike, one module each:

* :mod:`tokenskip.grading.extract` - :func:`extract_answer` (the final answer a response states),
  :func:`split_answer_tail` (``cot`` -> ``(reasoning, answer_tail)``) and :func:`find_last_boxed`,
  the one ``\\boxed{}`` parser of the project.
* :mod:`tokenskip.grading.normalise` - :func:`normalise_answer`, the canonical text both a stated
  and a gold answer are compared as.
* :mod:`tokenskip.grading.verify` - :func:`grade` / :func:`grade_batch` / :class:`Grader`: a
  :class:`Verdict` per response, math-verify run in worker processes that bound its time.

The names below are the package's public API; import them from here.
"""

from tokenskip.grading.extract import extract_answer, find_last_boxed, split_answer_tail
from tokenskip.grading.normalise import normalise_answer
from tokenskip.grading.verify import Grader, GradeResult, GradingConfig, Verdict, grade, grade_batch

__all__ = [
    "GradeResult",
    "Grader",
    "GradingConfig",
    "Verdict",
    "extract_answer",
    "find_last_boxed",
    "grade",
    "grade_batch",
    "normalise_answer",
    "split_answer_tail",
]
