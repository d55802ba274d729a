"""Ray mode: one engine per Ray actor (one per GPU by default), items fed to whichever actor is free.

Each actor builds its engine once and keeps at most two items queued, so a GPU
never waits for the driver. An actor that dies (its process killed, its node
lost) has its queued items sent to the other actors; an item whose worker died
under it MAX_WORKER_DEATHS times is recorded as failed instead (it may be what
kills them). Results come back as bytes: only the driver writes the output
folder, so workers need no shared file system for outputs (inputs, such as
depth maps and mask files, must be readable at the same paths on every node).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from threedis import UserError
from threedis.engine.batch.jobs import Item
from threedis.engine.batch.worker import EngineSpec, Outcome

INSTALL_HINT = "--ray needs Ray: pip install \"threedis-flux[ray]\" (or pip install \"ray>=2.9\")"
QUEUED_PER_WORKER = 2
MAX_WORKER_DEATHS = 3


def import_ray() -> Any:
    """The ray module, or a one-line UserError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


CPUS_PER_WORKER = 1  # each actor's CPU share; its torch thread count


class BatchWorker:
    """The actor body: an engine built once by ready(), then render() per item."""

    def __init__(self, spec: EngineSpec, name: str) -> None:
        from threedis.engine.batch.worker import worker_label

        self.spec = spec
        self.name = worker_label(name)
        self.engine = None

    def ready(self) -> dict[str, Any]:
        """Build the engine; a user mistake (missing weights, bad profile) comes back as text, not a crash."""
        import os

        from threedis import UserError

        import torch

        # Ray gives this actor one CPU; say so to torch too (not only through OMP_NUM_THREADS), so its
        # CPU renders are the same on every node and do not oversubscribe the cores.
        torch.set_num_threads(CPUS_PER_WORKER)
        start = time.perf_counter()
        try:
            self.engine, notes = self.spec.build_with_notes()
        except UserError as err:
            return {"ok": False, "error": str(err), "worker": self.name}
        return {"ok": True, "worker": self.name, "pid": os.getpid(), "load_s": time.perf_counter() - start,
                "nice": os.nice(0), "notes": notes}

    def render(self, item: Item) -> Outcome:
        from threedis.engine.batch.worker import render_item

        return render_item(self.engine, item, self.name)


def plan_workers(resources: dict[str, float], workers: int | None, gpus_per_worker: float | None) -> tuple[int, float]:
    """(workers, GPUs each): one per GPU of the cluster by default, one CPU worker when it has none."""
    gpus = float(resources.get("GPU", 0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus else 0.0
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker > 0 else 1
        if workers < 1:
            raise UserError(f"the Ray cluster has {gpus:g} GPU(s), fewer than --gpus-per-worker {gpus_per_worker:g}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if workers * gpus_per_worker > gpus + 1e-9:
        raise UserError(f"{workers} worker(s) x {gpus_per_worker:g} GPU(s) need {workers * gpus_per_worker:g} GPUs; "
                        f"the Ray cluster has {gpus:g} (pass --workers or --gpus-per-worker 0 for CPU workers)")
    cpus = float(resources.get("CPU", workers))
    if workers > cpus:  # each actor asks for one CPU: more would wait for a CPU forever
        raise UserError(f"{workers} Ray worker(s) need one CPU each; the Ray cluster has {cpus:g}")
    return workers, gpus_per_worker


def start_local_ray(ray: Any, num_cpus: int | None = None) -> None:
    """Start a Ray instance on this machine whose workers run at normal priority.

    Ray starts its workers at niceness 15 so that its own services stay responsive; here the
    workers do all the rendering, and at 15 any other work on the machine (a browser, a build,
    another job) takes nearly all the CPU from them: a 2-core machine with two busy processes
    gave them a few percent, and a 10 s batch took 3 minutes.
    """
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _system_config={"worker_niceness": 0})


class RayRunner:
    """Spreads items over Ray actors; connects to `address` ("local": start a Ray instance here)."""

    def __init__(self, spec: EngineSpec, address: str = "local", workers: int | None = None,
                 gpus_per_worker: float | None = None, on_resend: Callable[[Item], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.on_note = on_note
        self.address = address
        self.workers = workers
        self.gpus_per_worker = gpus_per_worker
        self.on_resend = on_resend
        self.worker_info: list[dict[str, Any]] = []
        self.resent = 0  # items sent again after their worker died

    def _connect(self, ray: Any) -> bool:
        """Join (or start) Ray; True when this runner started it and so must shut it down."""
        if ray.is_initialized():
            return False
        try:
            if self.address == "local":
                start_local_ray(ray)
            else:
                ray.init(address=self.address, log_to_driver=False)
        except ConnectionError as err:
            raise UserError(f"cannot reach the Ray cluster at {self.address}: {err}") from None
        return True

    def run(self, items: Iterable[Item]) -> Iterator[Outcome]:
        items = list(items)
        if not items:
            return
        ray = import_ray()
        started_here = self._connect(ray)
        actors: list[Any] = []
        try:
            workers, gpus = plan_workers(ray.cluster_resources(), self.workers, self.gpus_per_worker)
            actor_class = ray.remote(num_cpus=CPUS_PER_WORKER, num_gpus=gpus, max_restarts=0)(BatchWorker)
            actors = [actor_class.remote(self.spec, f"ray-{i}") for i in range(min(workers, len(items)))]
            self.worker_info = ray.get([actor.ready.remote() for actor in actors])
            failed = [info for info in self.worker_info if not info["ok"]]
            if failed:
                raise UserError(f"Ray worker {failed[0]['worker']}: {failed[0]['error']}")
            for note in self.worker_info[0].get("notes", []) if self.on_note is not None else ():
                self.on_note(f"{note} (each Ray worker)")
            yield from self._feed(ray, actors, items)
        finally:
            for actor in actors:
                ray.kill(actor)
            if started_here:
                ray.shutdown()

    def _feed(self, ray: Any, actors: list[Any], items: list[Item]) -> Iterator[Outcome]:
        from ray.exceptions import RayActorError

        pending = deque(items)
        deaths: dict[str, int] = {}
        alive = set(range(len(actors)))
        queued: dict[int, int] = {i: 0 for i in alive}
        in_flight: dict[Any, tuple[int, Item]] = {}
        while pending or in_flight:
            for index in sorted(alive):
                while pending and queued[index] < QUEUED_PER_WORKER:
                    item = pending.popleft()
                    in_flight[actors[index].render.remote(item)] = (index, item)
                    queued[index] += 1
            if not in_flight:
                raise UserError(f"every Ray worker died; {len(pending)} item(s) left: run the same command again "
                                f"to resume")
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            index, item = in_flight.pop(ready[0])
            queued[index] -= 1
            try:
                outcome = ray.get(ready[0])
            except RayActorError:
                alive.discard(index)
                deaths[item.name] = deaths.get(item.name, 0) + 1
                if deaths[item.name] >= MAX_WORKER_DEATHS:
                    yield _died(item, deaths[item.name])
                else:
                    pending.appendleft(item)
                    self.resent += 1
                    if self.on_resend is not None:
                        self.on_resend(item)
                continue
            yield outcome


def _died(item: Item, times: int) -> Outcome:
    now = time.time()
    return Outcome(job=item.job.id, seed=item.seed, status="failed", worker="ray", device="", pid=0,
                   error=f"the Ray worker rendering it died {times} times; this item may be what kills it",
                   error_type="WorkerDied", started=now, finished=now)
