"""`python -m medvqa …` — the command-line contract of DESIGN §9.

Errors a user can cause (bad arguments, missing files, bad input) print one line on stderr and
exit 2; other failures (ours) print one line and exit 1, with the traceback under MEDVQA_DEBUG=1.
`--json` prints exactly one JSON object on stdout.
One module per command family registers its subcommands here.
"""
from __future__ import annotations

import argparse
import sys

from medvqa.cli import analysis, calibrate, data, predict, train
from medvqa.cli.common import Parser, is_user_error, parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="medvqa", description="Medical VQA: CMI-MTL and CMDPI, with explanations.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for family in (data, train, calibrate, predict, analysis):
        family.register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    # a bad argument: one line and exit 2 (common.Parser)
    a = parse(parser, argv)
    try:
        return a.func(a) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # never a traceback for a user; MEDVQA_DEBUG=1 shows it for our own faults
        import os

        if is_user_error(e, a):   # one line: a message may carry a library's multi-line text (a state dict's keys)
            print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
            return 2
        if os.environ.get("MEDVQA_DEBUG"):
            raise
        first = str(e).strip().splitlines()[:1]   # one line, whatever the exception's message holds
        print(f"error: {e.__class__.__name__}" + (f": {first[0]}" if first else "")
              + " (an internal error; MEDVQA_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:  # under torchrun: tear gloo/NCCL down while the interpreter is whole (else a rank can abort at exit)
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
