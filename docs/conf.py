"""Sphinx configuration of the course's website. Build it with `make site` (quick mode, offline) or
`make site-publish` (the default mode, as GitHub Pages shows it); docs/building.md explains both."""
import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))

import diffusion_course  # noqa: E402
from diffusion_course import exercises, utils  # noqa: E402

from course_execution import cache_folder  # noqa: E402

# The run mode sizes what the lessons train. The kernels that execute the lessons inherit this process's
# environment, so the mode is fixed here once for the whole build (CI alone would otherwise mean quick).
MODE = utils.run_mode()
os.environ[utils.MODE_ENV] = MODE
REPOSITORY = exercises.repository_url(ROOT)
OWNER, NAME = exercises.github_path(REPOSITORY).split("/")

project = "Diffusion models, derived and built"
author = "the authors of diffusion-course"
copyright = "the authors of diffusion-course, MIT licence"
release = version = diffusion_course.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "course_lessons",
    "course_api",
    "course_execution",
]
course_root = str(ROOT)
course_run_mode = MODE

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
html_static_path = ["_static"]
html_css_files = ["course.css"]

# Lessons: executed through jupyter-cache (see _ext/course_execution.py for where it lives and why).
nb_execution_mode = "cache"
nb_execution_cache_path = str(cache_folder(ROOT, MODE))
nb_execution_timeout = 600 if MODE == "quick" else -1
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_execution_in_temp = True
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# API reference
autodoc_member_order = "bysource"
autodoc_typehints = "description"

html_theme = "sphinx_book_theme"
html_title = project
html_baseurl = f"https://{OWNER}.github.io/{NAME}/"
html_theme_options = {
    "repository_url": REPOSITORY,
    "repository_branch": "main",
    "use_repository_button": True,
    "use_issues_button": True,
    "show_toc_level": 2,
    "home_page_in_toc": True,
}

# Docstrings that are not valid reStructuredText yet (a table or formula laid out as plain text, |x| read
# as a substitution). They are shown as written, with their lesson links, instead of failing the build;
# any docstring not listed here that breaks reStructuredText fails `make site`. Remove a name once its
# docstring is fixed.
course_docstrings_shown_verbatim = [
    "diffusion_course.ae_training",
    "diffusion_course.checkpoint",
    "diffusion_course.ddpm.slerp",
    "diffusion_course.ldm",
    "diffusion_course.losses",
    "diffusion_course.losses.PerceptualLoss",
    "diffusion_course.losses.logit_input_gradient",
    "diffusion_course.losses.pixel_loss",
    "diffusion_course.nn.encoder",
    "diffusion_course.nn.unet",
    "diffusion_course.shapes",
    "diffusion_course.vae",
]

# The lessons are notebooks first: some go from a title straight to a third-level heading, which only
# shapes the page's table of contents. Every other warning fails the build.
suppress_warnings = ["myst.header"]
