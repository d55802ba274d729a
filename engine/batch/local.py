"""Local mode: one Engine in this process, models loaded once, items rendered one after another."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from threedis import Engine
from threedis.engine.batch.jobs import Item
from threedis.engine.batch.worker import EngineSpec, Outcome, render_item, worker_label


class LocalRunner:
    """Renders items in order on one engine (built from `spec` at the first item, or the one given).

    on_note: told, once the engine is built, which auxiliary models stay loaded across items.
    """

    def __init__(self, spec: EngineSpec, engine: Engine | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self.engine = engine
        self.on_note = on_note
        self.worker = worker_label("local")

    def run(self, items: Iterable[Item]) -> Iterator[Outcome]:
        items = list(items)
        if not items:
            return
        if self.engine is None:
            self.engine, notes = self.spec.build_with_notes()
            for note in notes if self.on_note is not None else ():
                self.on_note(note)
        for item in items:
            yield render_item(self.engine, item, self.worker)
