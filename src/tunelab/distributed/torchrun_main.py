"""What ``tunelab train --nproc`` runs: torchrun's own ``main``, without its traceback on failure.

When a worker fails, that worker has already printed tunelab's one-paragraph
error; torchrun would add a page of its own traceback around it.  Here its
exit code is passed on instead (the first failing worker's), so a user mistake
reads the same with ``--nproc`` as without.  Run as ``python -m``; never imported.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def run(argv: list[str]) -> int:
    """torchrun with ``argv``; returns the exit code of the first worker that failed (0 if none did)."""
    try:
        main(argv)
    except ChildFailedError as exc:
        _rank, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
    except SignalException as exc:  # Ctrl-C or SIGTERM: the workers were told and have stopped
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
