"""`python -m gdn_lab` / `gdn-lab`: run the notebooks, list the presets, or train.

    gdn-lab                      same as `gdn-lab run`: every notebook at smoke size (CPU, offline)
    gdn-lab run [NOTEBOOK ...] [--profile smoke|full] [--run-dir DIR] [--param name=value ...]
    gdn-lab presets              the model presets with their sizes and parameter counts
    gdn-lab train ...            the training loop from the command line (see `gdn-lab train --help`)
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gdn-lab", description="gdn_lab: a notebook research workbook for Gated DeltaNet. "
                                    "With no command: run every notebook at smoke size.")
    commands = parser.add_subparsers(dest="command", metavar="{run,presets,train}")
    run = commands.add_parser(
        "run", help="execute notebooks with papermill and summarise their metrics",
        description="Execute the numbered notebooks (or those named) with papermill. Executed copies and "
                    "each notebook's metrics.json land in RUN_DIR/<stem>/.")
    run.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                     help="stem (02_toy_tasks), number (2) or path to an .ipynb; default: all numbered notebooks")
    run.add_argument("--profile", choices=("smoke", "full"), default="smoke",
                     help="smoke: tiny CPU parameters from ci_params.yml; full: the notebooks' own defaults")
    run.add_argument("--run-dir", help="where results go (default: runs/<date-time>-<profile>)")
    run.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                     help="set a parameter in every notebook run (a Python literal; repeatable)")
    run.add_argument("--notebooks-dir", help="folder of NN_*.ipynb notebooks (default: the repository's notebooks/)")
    run.add_argument("--params-file", help="smoke parameters (default: ci_params.yml beside the notebooks)")
    commands.add_parser("presets", help="print the model presets table")
    commands.add_parser("train", help="train a model (arguments go to gdn_lab.train)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from . import train

        return train.main(argv[1:]) or 0
    args = _parser().parse_args(argv or ["run"])
    if args.command == "presets":
        from .models import preset_table

        print(preset_table())
        return 0
    from .runner import run_command

    return run_command(args.notebooks, args.profile, args.run_dir, args.param, args.notebooks_dir, args.params_file)


if __name__ == "__main__":
    sys.exit(main())
