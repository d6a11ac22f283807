"""What every command module and the dispatcher share: the user-error type and the JSON printer."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from medvqa.data import DataError, ImageError, InputError
from medvqa.train.checkpoint import CheckpointError


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


# What a user's input causes: one line and exit 2. Anything else is a fault of ours: exit 1.
USER_ERRORS = (UserError, DataError, ImageError, InputError, CheckpointError)


def is_user_error(e: BaseException, a) -> bool:
    """A user error, or a file the command line names that is not there (a missing file of
    our own, a cache entry say, is an internal error)."""
    if isinstance(e, USER_ERRORS):
        return True
    if isinstance(e, FileNotFoundError) and e.filename is not None:
        given = [v for v in vars(a).values() for v in (v if isinstance(v, list) else [v]) if isinstance(v, Path)]
        return any(Path(e.filename).absolute() == p.absolute() for p in given)
    return False


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
