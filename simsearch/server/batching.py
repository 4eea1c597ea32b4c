"""Uploads embedded together: requests queue their image, one worker thread runs the model on a batch."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger("simsearch.serve")


class UploadBatcher:
    """Embeds uploaded images together: requests queue their image, one worker thread runs the model
    on up to `batch_size` of them at a time, and each request awaits its own row."""

    def __init__(self, encoder: Any, batch_size: int, wait_ms: float):
        self.encoder, self.batch_size, self.wait_s = encoder, batch_size, wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.worker = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    async def embed(self, image: Image.Image) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    async def _run(self) -> None:
        while True:
            pending = [await self.queue.get()]
            deadline = time.perf_counter() + self.wait_s
            while len(pending) < self.batch_size and (left := deadline - time.perf_counter()) > 0:
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            try:
                vectors = await asyncio.to_thread(self.encoder.encode, [image for image, _ in pending])
                for (_, future), vector in zip(pending, vectors):
                    if not future.done():
                        future.set_result(vector)
            except Exception as error:  # a model failure answers every waiting request, and serving goes on
                log.exception("embedding a batch of %d uploads failed", len(pending))
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)


