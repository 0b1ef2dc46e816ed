"""Command line: ``python -m diffusion_course <command>``.

* ``env``              print the environment report (versions, device, run mode)
* ``build [--check]``  build the learners' notebooks and the README's lesson table (see ``exercises``)
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion_course", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, device and run mode")
    b = sub.add_parser("build", help="generate the learners' notebooks and the README lesson table")
    b.add_argument("--check", action="store_true", help="change nothing; fail if anything is out of date")
    args = parser.parse_args(argv)

    if args.command == "env":
        from .utils import env_report

        env_report()
        return 0
    if args.command == "build":
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
    return 2


if __name__ == "__main__":
    sys.exit(main())
