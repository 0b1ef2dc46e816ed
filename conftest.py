"""Test-suite settings: notebooks run in quick mode, figures render off screen."""
import os

os.environ["DIFFUSION_COURSE_MODE"] = "quick"
os.environ.setdefault("MPLBACKEND", "Agg")
