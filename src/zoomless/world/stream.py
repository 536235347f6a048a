"""Fresh training scenes while training runs.

A small model shown the same few thousand scenes again and again memorizes their answers instead
of learning to find the evidence (docs/ZOOMWORLD.md: with 12,000 scenes the full-view training
loss fell to 0.1 while validation accuracy stayed flat). The generator is cheap, so here the next
`n` scenes of the split, never seen before, are rendered in a background thread (whose worker
processes do the drawing) while the GPU trains on the current ones; `poll()` hands them over once
they are ready. Training never waits: how often a scene is seen depends on how fast rendering
keeps up, and `chunks` says how many sets were used.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any, Sequence

import torch

from zoomless.world.tensors import Cancelled, WorldSpec, WorldTensors, build_world


class FreshScenes:
    def __init__(self, spec: WorldSpec, n: int, views: Sequence[str], processor: Any, eos_id: int, *,
                 device: str | torch.device = "cpu", workers: int = 0, first: WorldTensors | None = None):
        self.spec, self.n, self.views = replace(spec), n, tuple(views)
        self._build = dict(processor=processor, eos_id=eos_id, device=device, workers=workers, progress=False)
        self.current = first if first is not None else build_world(spec, n, self.views, **self._build)
        self.chunks = 1  # scene sets handed to training so far, the first included
        self._next_start = n
        self._thread: threading.Thread | None = None
        self._result: dict[str, Any] = {}
        self._stop = threading.Event()
        self._start_next()

    def _start_next(self) -> None:
        start, self._next_start = self._next_start, self._next_start + self.n

        def work() -> None:
            try:
                self._result["world"] = build_world(self.spec, self.n, self.views, start=start, stop=self._stop,
                                                    **self._build)
            except Cancelled:
                pass
            except BaseException as e:  # reported on the training thread by poll()
                self._result["error"] = e

        self._thread = threading.Thread(target=work, name=f"zoomworld-scenes-{start}", daemon=True)
        self._thread.start()

    def poll(self) -> WorldTensors | None:
        """The next set of scenes if it is ready (and the rendering of the one after starts), else None."""
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread.join()
        if "error" in self._result:
            raise RuntimeError(f"rendering fresh {self.spec.split} scenes failed: {self._result['error']}") \
                from self._result["error"]
        self.current = self._result.pop("world")
        self.chunks += 1
        self._start_next()
        return self.current

    def wait(self) -> WorldTensors:
        """Block until the next set is ready and take it (for tests and for a forced refresh)."""
        assert self._thread is not None
        self._thread.join()
        world = self.poll()
        assert world is not None
        return world

    def close(self) -> None:
        """Stop handing over scenes and abandon the rendering in flight. Its thread is joined: a
        thread left running with worker processes at interpreter exit aborted a GPU run (exit -6,
        "terminate called without an active exception", 2026-12-06)."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(timeout=60)
