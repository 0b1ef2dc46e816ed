"""diffusion_course: the package behind the diffusion-model course.

One module per idea, named as the lessons name it (see the README's lesson table):
``schedules`` and ``ddpm`` (lessons 01-03), ``data`` and ``utils`` (lesson 00), ``viz`` for figures,
``denoisers`` for the small networks of lesson 03, ``checks`` for the exercise checkers and
``exercises`` for the tool that builds the learners' notebooks.
"""
__version__ = "0.1.0"
