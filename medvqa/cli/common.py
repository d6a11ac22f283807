"""What every command module and the dispatcher share: the user-error type and the JSON printer."""
from __future__ import annotations

import json
import math

from medvqa.data import DataError, ImageError


class UserError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


USER_ERRORS = (UserError, DataError, ImageError, FileNotFoundError, ValueError)


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
