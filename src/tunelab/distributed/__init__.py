"""Several processes on one run: torchrun's environment, collectives and data sharding.

Nothing here imports torch at module level; the torch process group is set up
only when ``WORLD_SIZE`` says the process was started by torchrun (or by
``tunelab train --nproc N``, which runs torchrun).
"""

from tunelab.distributed.group import SOLO, Group, SoloGroup, join, rank_from_env
from tunelab.distributed.sharding import DataParallel, check_parallel

__all__ = ["SOLO", "DataParallel", "Group", "SoloGroup", "check_parallel", "join", "rank_from_env"]
