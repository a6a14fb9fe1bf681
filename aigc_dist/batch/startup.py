"""Start-up of a backfill session: the partition pass runs while the actor pools start.

A new run's shard count is known once its input is counted, before the partition pass writes a row;
the generator actors (process start, imports, artifact load: most of a run's fixed cost) need
nothing from the pass. So the driver starts the generation pipeline at once and runs the pass on a
thread beside it; the preparers, the only stage that reads what the pass writes, wait on an
`InputGate` until the pass has written the input and the plan, and get the items snapshot from it.
A pass that fails opens the gate with its error: the preparers then emit no task, the pipeline ends,
and the driver raises the pass's own error (the one that names the input or the setting to change),
with no traceback of Ray Data's.

The overlap needs CPUs for the pass's read tasks beside the pools: a cluster without that room runs
the pass first, as before (an actor pool that takes every CPU would starve the pass that feeds it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class InputGate:
    """Ray actor (no CPU, on the driver's node): the items snapshot's blocks once the pass is done."""

    def __init__(self) -> None:
        self._opened = asyncio.Event()
        self._value: tuple[list[Any], str | None] = ([], None)

    async def open(self, item_refs: list[Any], error: str | None = None) -> None:
        # (refs inside a list are passed by reference: the preparers fetch the blocks themselves)
        self._value = (item_refs, error)
        self._opened.set()

    async def wait(self) -> tuple[list[Any], str | None]:
        await self._opened.wait()
        return self._value


def start_gate() -> Any:
    """An InputGate on this (the driver's) node: it lives and dies with the driver, never with a worker."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(InputGate).options(scheduling_strategy=here).remote()


def room_to_overlap(pool_cpus: float) -> bool:
    """Whether the cluster has a CPU for the pass's tasks beside actor pools of `pool_cpus` CPUs.

    A one-node Ray is judged by the machine's cores: the local Ray of `ensure_ray` has more logical
    CPUs than cores (so that the pools cannot starve the tasks that feed them), and on a machine
    with fewer cores than pools + pass the actors' start (imports, model load) and the pass are both
    CPU work: overlapping them only shares the same cores (a one-off probe at 200,000 rows on 2
    cores: the first row came later overlapped than sequential).
    """
    import os

    import ray

    free = ray.available_resources().get("CPU", 0.0)
    if sum(1 for node in ray.nodes() if node.get("Alive")) == 1:
        free = min(free, float(os.cpu_count() or 1))
    return free >= pool_cpus + 1


@contextmanager
def input_ready(gate: Any, write_pass: Callable[[], None] | None, item_refs: Callable[[], list[Any]],
                overlap: bool) -> Iterator[None]:
    """Run the body (the generation pipeline) while the pass writes the input; open `gate` after it.

    `write_pass` is None when the plan existed (a resumed run: the gate opens at once); `item_refs`
    reads the items snapshot the pass wrote. Errors of the pass take precedence over the body's: the
    body fails because the pass did.
    """
    failure: list[BaseException] = []

    def run_pass() -> None:
        try:
            if write_pass is not None:
                write_pass()
            gate.open.remote(item_refs())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the driver's thread below
            failure.append(exc)
            gate.open.remote([], f"{type(exc).__name__}: {exc}")

    if write_pass is None or not overlap:
        if write_pass is not None:
            log.info("the partition pass runs before the actor pools start (backfill.startup_overlap; "
                     "auto: no CPU to spare for it beside them)")
        run_pass()
        if failure:
            raise failure[0]
        yield
        return
    thread = threading.Thread(target=run_pass, name="backfill-partition", daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        thread.join()
        if failure:
            raise failure[0] from None
        raise
    thread.join()
    if failure:
        raise failure[0]
