"""Ids handed out from blocks reserved ahead in a shared database (cluster mode: several
workers create jobs and pushes, each from blocks of a PostgreSQL sequence of its own). The
hot path takes an id from memory; whoever owns the blocks keeps a spare one reserved."""
from __future__ import annotations


class IdBlocks:
    def __init__(self, what: str) -> None:
        self.what = what  # for the error: "job ids", "push ids"
        self.blocks: list[range] = []  # reserved, not started
        self._next = 0
        self._limit = 0

    def add(self, block: range) -> None:
        self.blocks.append(block)

    def take(self) -> int:
        """The next id; RuntimeError when every reserved block is spent (the database has not
        answered the reservations for a whole block's worth of ids)."""
        if self._next >= self._limit:
            if not self.blocks:
                raise RuntimeError(f"no {self.what} reserved: the shared database has not answered")
            block = self.blocks.pop(0)
            self._next, self._limit = block.start, block.stop
        taken = self._next
        self._next += 1
        return taken
