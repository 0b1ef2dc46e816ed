"""diffusion_course: the package behind the diffusion-model course.

One module per idea, named as the lessons name it (see the README's lesson table):
``schedules`` and ``ddpm`` (lessons 01-03), ``solvers`` (DPM-Solver++ 2M, lesson 03), ``data`` and ``utils`` (lesson 00), ``viz`` for figures,
``denoisers`` for the small networks of lesson 03, ``nn`` for the U-Net (lesson 04) and its transformer
blocks and condition encoders (lesson 07), ``vae`` (05), ``autoencoder`` and ``losses`` (06), ``shapes``,
``conditions``, ``guidance`` and ``classifier`` for conditioning (07), ``training`` for the engine,
``checks`` for the exercise checkers and ``exercises`` for the tool that builds the learners' notebooks.
"""
__version__ = "0.1.0"
