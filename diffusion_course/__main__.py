"""Command line: ``python -m diffusion_course <command> --help``.

* ``env``              print the environment report (versions, device, run mode)
* ``build [--check]``  build the learners' notebooks and the README's lesson table (see ``exercises``)
* ``train``, ``sample`` train a U-Net, continue a run, write a grid of samples (see ``training``)
* ``train-classifier`` train the digit classifier behind the sample-quality measure (see ``metrics``)
* ``train-autoencoder``, ``export-autoencoder`` train and ship the lesson-06 autoencoder (see ``ae_training``)
* ``train-shape-classifier`` train the shapes segmenter that scores captions in lesson 07 (see ``classifier``)
* ``train-sr``, ``export-sr`` train and ship the super-resolution models of lesson 09 (see ``sr_training``)

Other modules add their own commands (training, sampling, ...): each module named in ``COMMAND_MODULES``
defines ``register_cli(subparsers)``, which adds its sub-parsers with ``set_defaults(func=handler)``;
a handler takes the parsed arguments and returns the exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

COMMAND_MODULES: tuple = ("diffusion_course.train_cli", "diffusion_course.pretrained", "diffusion_course.metrics",
                          "diffusion_course.ae_training", "diffusion_course.classifier",
                          "diffusion_course.sr_training")


def _env(args: argparse.Namespace) -> int:
    from .utils import env_report

    env_report()
    return 0


def _build(args: argparse.Namespace) -> int:
    from .exercises import build

    changed = build(check=args.check)
    if args.check:
        if changed:
            print("out of date (run `python -m diffusion_course build`):\n  " + "\n  ".join(changed))
            return 1
        print("notebooks and README are up to date")
        return 0
    print("updated:\n  " + "\n  ".join(changed) if changed else "nothing to update")
    return 0


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser with every registered command. Lesson: 00_setup."""
    parser = argparse.ArgumentParser(prog="python -m diffusion_course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", dest="cpu_threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (default: DIFFUSION_COURSE_THREADS if set, else torch's choice); "
                             "give each of two jobs on two cores one thread")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, device and run mode").set_defaults(func=_env)
    b = sub.add_parser("build", help="generate the learners' notebooks and the README lesson table")
    b.add_argument("--check", action="store_true", help="change nothing; fail if anything is out of date")
    b.set_defaults(func=_build)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; returns its exit status. Lesson: 00_setup."""
    parser = make_parser()
    args = parser.parse_args(argv)
    from .utils import set_cpu_threads

    try:
        set_cpu_threads(args.cpu_threads)
    except ValueError as e:
        parser.error(str(e))
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # a damaged checkpoint or weights file: one clear line, no traceback
        from .checkpoint import DamagedCheckpoint
        if not isinstance(e, DamagedCheckpoint):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
