"""Checkers for the lessons' exercises.

Each ``check_*`` function takes the learner's function, runs it against the package's reference on
seeded random inputs and prints a verdict:

* correct: it says so and returns the learner's function, which the lesson then uses;
* still a stub (it raises ``NotImplementedError``): it says "not implemented yet" and returns the
  reference, so the lesson carries on;
* wrong: it raises :class:`ExerciseFailed` (an ``AssertionError``) naming the first failing case. Help comes
  in tiers: the first failure of an exercise gives a nudge (the idea, not the formula), the second and later
  ones the full hint. Fix the function, or put the stub back to skip the exercise.

Help on request: ``show_hint("N.k")`` prints the full hint of an exercise whose checker has run,
``show_solution("N.k")`` its worked solution, and ``set_hints("full")`` (or the environment variable
``DIFFUSION_COURSE_HINTS=full``) shows the full hint on every failure.

One module per lesson (``lesson01`` ... ), sharing the runner in ``_runner``;
every checker is importable from here. The exercise mechanism itself (solution markers, the generated learner notebooks) is described in
:mod:`diffusion_course.exercises`. Taught in lesson 00_setup.
"""
from ._runner import (Case, CaseRejected, ExerciseFailed, fail, register_hint, reset_hints, run_check, set_hints,
                      show_hint, show_solution)
from . import lesson01, lesson02, lesson03, lesson04, lesson05, lesson06, lesson07
from .lesson01 import *  # noqa: F401,F403
from .lesson02 import *  # noqa: F401,F403
from .lesson03 import *  # noqa: F401,F403
from .lesson04 import *  # noqa: F401,F403
from .lesson05 import *  # noqa: F401,F403
from .lesson06 import *  # noqa: F401,F403
from .lesson07 import *  # noqa: F401,F403
from .lesson08 import *  # noqa: F401,F403
from .lesson09 import *  # noqa: F401,F403

# every (exercise, checker, reference) of a one-function checker, in lesson order; lesson08.CHECKS is kept
# apart (8.1 checks two functions) and tested in tests/test_checks_lesson08.py, and lesson 09's checkers (a
# module class, raised errors, dicts) in tests/test_checks_lesson09.py
ALL_CHECKS = (lesson01.CHECKS + lesson02.CHECKS + lesson03.CHECKS + lesson04.CHECKS + lesson05.CHECKS
              + lesson06.CHECKS + lesson07.CHECKS)
