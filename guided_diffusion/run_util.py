"""Deprecated: split into `cli` (flags, setup, models, run_main) and `sample_util` (sampling
output). These aliases keep code written against the old module working; import from the two."""

from .cli import *  # noqa: F401,F403
from .cli import apply_fast_flags as apply_fast_path  # noqa: F401 - the old name
from .sample_util import *  # noqa: F401,F403
