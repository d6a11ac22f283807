"""What every command module and the dispatcher share: the user-error type, argument types and the JSON printer."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from medvqa.data import DataError, ImageError, InputError
from medvqa.train.checkpoint import CheckpointError
from medvqa.train.trainer import DivergedError


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# What a user's input causes: one line and exit 2. Anything else is a fault of ours: exit 1.
USER_ERRORS = (UserError, DataError, ImageError, InputError, CheckpointError, DivergedError)


def is_user_error(e: BaseException, a) -> bool:
    """A user error, or a path the command line names that cannot be read or written: the path itself,
    a folder on its way, a file inside it, or its temporary sibling (NAME.tmp, .NAME.tmp-PID). A file
    of our own elsewhere, a cache entry say, is an internal error."""
    if isinstance(e, USER_ERRORS):
        return True
    if isinstance(e, OSError) and e.filename is not None:
        f = Path(e.filename).absolute()
        given = [v.absolute() for v in vars(a).values() for v in (v if isinstance(v, list) else [v])
                 if isinstance(v, Path)]
        return any(f == p or p in f.parents or f in p.parents
                   or (f.parent == p.parent and (f.name == p.name + ".tmp" or f.name.startswith(f".{p.name}.")))
                   for p in given)
    return False


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's contract for a bad argument: one line on stderr, exit 2 (argparse's own
    error prints the usage block first). Subcommand parsers inherit it (add_subparsers uses this class)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see: python -m {self.prog} --help)\n")


def _whole_from(s: str, least: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a whole number") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"{s}: use {least} or more")
    return v


def count(s: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    return _whole_from(s, 1)


def check_writable(out: Path, file: bool = False):
    """An --out that could not be written fails now, not after minutes of work; nothing is made yet, so a
    command refused later leaves no folder behind. `file`: --out names a file, so a folder there is refused."""
    if file and out.is_dir():
        raise UserError(f"--out {out}: a folder; give a file name")
    p = out.absolute().parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--out {out}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {p}")
    if file and p == out.absolute().parent:   # its folder is there: try the file itself (root passes access())
        try:
            if not os.path.lexists(out):   # made and removed here, nothing else: O_EXCL never follows a link
                os.close(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
                os.unlink(out)
            elif out.is_file():            # appending nothing leaves it as it is; a FIFO or device is not opened
                open(out, "ab").close()
        except OSError as e:
            raise UserError(f"--out {out}: cannot be written ({e.strerror})") from None


def whole(s: str) -> int:
    """An argparse type: a whole number of 0 or more."""
    return _whole_from(s, 0)


def seed(s: str) -> int:
    """An argparse type: a random seed, 0 to 2**32 - 1 (numpy's range)."""
    v = whole(s)
    if not seed_ok(v):
        raise argparse.ArgumentTypeError(f"{s}: use a seed from 0 to 2**32 - 1")
    return v


def seed_ok(v: int) -> bool:
    return 0 <= v < 2 ** 32


def fraction(s: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{s}: use a value in [0, 1]")
    return v


def colormap(s: str) -> str:
    """An argparse type: a matplotlib colormap name."""
    import matplotlib

    if s not in matplotlib.colormaps:
        raise argparse.ArgumentTypeError(f"{s!r} is not a matplotlib colormap (e.g. jet, viridis, inferno)")
    return s


def print_json(obj):
    def clean(x):  # NaN is not JSON
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    print(json.dumps(clean(obj)))


def parse(parser, argv=None):
    """parser.parse_args, keeping the arguments as `argv`: a checkpoint records the command that made it,
    also when the app or a sweep runs it in-process (where sys.argv is theirs)."""
    a = parser.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    return a
