"""sha256 of a shard's bytes on a worker thread, fed the same blocks the reader decodes.

Hashing the blocks as they are parsed (not the file a second time) makes ``data_fingerprint``
the hash of exactly the bytes the rows came from, even if the file changes while it is read.
"""

from __future__ import annotations

import hashlib
import queue
import threading


class BackgroundSha256:
    """sha256 of the blocks handed to :meth:`update`, computed on a worker thread.

    ``hashlib`` releases the GIL on large buffers, so with a second core the fingerprint costs
    the reader no wall time. At most ``depth`` blocks wait (memory stays bounded on a busy machine).
    """

    def __init__(self, depth: int = 4) -> None:
        self._digest = hashlib.sha256()
        self._blocks: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (block := self._blocks.get()) is not None:
                self._digest.update(block)
        except BaseException as error:  # keep taking blocks so the reader never waits; hexdigest raises
            self._error = error
            while self._blocks.get() is not None:
                pass

    def update(self, block: bytes) -> None:
        self._blocks.put(block)

    def close(self) -> None:
        """Stop the worker once the queued blocks are hashed; idempotent."""
        if self._thread.is_alive():
            self._blocks.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()
