"""Local mode: one Engine in this process, models loaded once, items rendered one after another."""

from __future__ import annotations

from typing import Iterable, Iterator

from threedis import Engine
from threedis.engine.batch.jobs import Item
from threedis.engine.batch.worker import EngineSpec, Outcome, render_item, worker_label


class LocalRunner:
    """Renders items in order on one engine (built from `spec` at the first item, or the one given)."""

    def __init__(self, spec: EngineSpec, engine: Engine | None = None) -> None:
        self.spec = spec
        self.engine = engine
        self.worker = worker_label("local")

    def run(self, items: Iterable[Item]) -> Iterator[Outcome]:
        items = list(items)
        if not items:
            return
        if self.engine is None:
            self.engine = self.spec.build()
        for item in items:
            yield render_item(self.engine, item, self.worker)
