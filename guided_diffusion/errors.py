"""The project's exceptions, at the bottom of the layers so that every module can raise them.

`cli.run_main` turns each of these into one line `error: ...` and exit status 1: they are the
user's mistakes (a flag, a file, a folder), never our bugs. The modules that raise them re-export
their names (`checkpoints.CheckpointError`, `image_datasets.DataError`, ...), where the original or
earlier versions of this project defined them.
"""

from __future__ import annotations


class ScriptError(Exception):
    """A mistake in the command line or its files: reported as one line, without a traceback."""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read (unsafe, corrupt, or not a state_dict)."""


class CheckpointMismatchError(ValueError):
    """A state_dict's names or shapes do not fit the model built from the given flags."""


class RunFlagsError(ValueError):
    """This command's flags differ from the run's `args.json` in a flag that changes results."""


class DataError(ValueError):
    """The data folder cannot be trained on (empty, unreadable images, labels beyond
    --num_classes): reported as one line before training starts."""


class WriteError(OSError):
    """A file could not be written (full disk, read-only folder): names the path; the previous
    version of the file, if any, is untouched."""


class BridgeError(ValueError):
    """A model, flag or folder that cannot move to or from diffusers (`diffusers_bridge`); the
    message names which."""


class TrainingStopped(ScriptError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says why."""


class PeerLostError(ScriptError):
    """A collective failed: a peer died or did not answer within `--dist_timeout`."""


# The errors `cli.run_main` reports as one line. OSError: files and devices (missing, unreadable,
# full disk, read-only), never our bugs.
USER_ERRORS = (ScriptError, CheckpointError, CheckpointMismatchError, RunFlagsError, DataError,
               BridgeError, OSError)
