"""The processes of one launch (one, unless ``accelerate launch`` started N), as rlhfkit's chain and
evaluation see them: the main process decides and writes; ``share`` hands its values to the
others; ``spread`` runs independent pieces of work on all of them. Below the chain and the
evaluation that use it; the training stages get their processes from accelerate directly.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence, TypeVar

from rlhfkit.errors import ConfigError

T = TypeVar("T")


# The launch as its launcher (torchrun, accelerate launch) describes it in the environment: read here alone,
# before any process group or model exists (config validation, folder locks, the batch arithmetic).
def launch_rank() -> int:
    """This process's rank in its launch (0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def launch_size() -> int:
    """The number of processes of this launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


class Processes:
    """The processes of this launch; with one (no launcher, or WORLD_SIZE 1) ``share`` and ``spread`` are local."""

    def __init__(self):
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # joins the launch's process group (gloo on CPU, as the stages' Accelerator does); made before
        # any other PartialState, since the first one made sets it up for the whole process
        self.state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
        expected = launch_size()
        if self.state.num_processes != expected:  # as the RL stage refuses it (make_accelerator)
            raise ConfigError(f"the launcher gives {self.state.num_processes} process(es) but WORLD_SIZE is "
                              f"{expected}; on CPU launch with ACCELERATE_USE_CPU=true")
        self.alone = expected == 1

    @property
    def main(self) -> bool:
        return self.state.is_main_process

    @property
    def device(self):
        """This process's device (its GPU when there is one)."""
        return self.state.device

    def share(self, value: Any = None) -> Any:
        """The main process's ``value``, on every process (a broadcast; every process must call it)."""
        if self.alone:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


    def spread(self, tasks: Sequence[Callable[[], T]]) -> list[T]:
        """Task i runs on process i mod N; every process gets every result, in the tasks' order.

        For work whose pieces do not depend on where they run (each evaluation draw seeds its own
        generator), so the results are those of one process running them all."""
        if self.alone:
            return [task() for task in tasks]
        from accelerate.utils import gather_object

        n, rank = self.state.num_processes, self.state.process_index
        mine = {i: task() for i, task in enumerate(tasks) if i % n == rank}
        results: dict[int, T] = {}
        for part in gather_object([mine]):
            results.update(part)
        return [results[i] for i in range(len(tasks))]
