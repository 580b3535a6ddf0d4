"""Where lazily restored pages come from.

A `PageSource` knows the pending pages of one address space (as found in the image) and hands out, for a run
of file pages, the address in *our* address space holding their bytes, ready for UFFDIO_COPY: the server never
copies page data through Python.

    ImagePageSource     pages-PID.img mapped read-only (images.PageFile); every 64 KiB chunk is checked against
                        its checksum the first time a page of it is served.
    RemotePageSource    (future) a page server over a socket: `synchronous` is False, the server asks with
                        request() and learns of arrivals through fileno() becoming readable, then collect().
                        The server's loop already treats sources as things that may fail (PageSourceLost) and
                        keys its work by file page index, which is what such a request carries.

A source failure (checksum mismatch, truncated or unreadable page file, a lost connection) is reported as
`PageSourceLost`: the served process must then be killed, never left to run on zero-filled memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from lazarus.errors import ImageError, PageSourceLost
from lazarus.lazy.ranges import PAGE_SIZE, PendingPages

PAGES_PER_CHUNK = 65536 // PAGE_SIZE


@runtime_checkable
class PageFileLike(Protocol):
    """What ImagePageSource needs of lazarus.images.PageFile."""

    def address(self, file_page_index: int) -> int: ...

    def verify_chunk_for(self, page_index: int) -> None: ...


@runtime_checkable
class PageSource(Protocol):
    """A provider of page contents for one address space (shared by the fork children of that space)."""

    name: str
    synchronous: bool

    def pending(self) -> PendingPages:
        """A fresh set of the pages this source holds (the pages still to fill at the start)."""
        ...

    def address(self, file_index: int, npages: int) -> int:
        """Address (in this process) of file pages [file_index, file_index+npages), readable as one block.

        Raises:
            PageSourceLost when the data cannot be trusted or read.
        """
        ...

    def prefetch(self, file_index: int, npages: int) -> None:
        """Hint that these file pages come next (a source may start reading/verifying them). Optional."""
        ...

    def close(self) -> None: ...


class ImagePageSource:
    """Pages of one task from its image: the task's lazy vmas and its PageFile.

    Parameters:
        vmas: the task's lazy vmas, each a mapping with "pages": [[vaddr, npages, file_page_index], ...]
            (other keys are ignored).
        page_file: an images.PageFile (or anything with .address(i) and .verify_chunk_for(i)).
        name: for messages, e.g. "pages-42.img".
        verify: check each 64 KiB chunk against its checksum before its first use (default True). Hashing
            (xxh3, ~14 GB/s here) costs ~15% of background throughput; a verify-ahead thread was measured and
            made it worse on this 2-vCPU machine, so it is done inline, just before the copy (which then
            finds the data in cache).
    """

    synchronous = True

    def __init__(self, vmas: Iterable[Mapping[str, Any]], page_file: PageFileLike, *, name: str = "",
                 verify: bool = True) -> None:
        self.name = name or str(getattr(page_file, "name", "page file"))
        self._pf = page_file
        self._verify = verify
        self._verified = bytearray()  # one byte per 64 KiB chunk: 1 once its checksum matched
        runs = []
        for vma in vmas:
            for vaddr, npages, fidx in vma.get("pages", ()):
                runs.append((int(vaddr), int(npages), int(fidx)))
        try:
            self._pending = PendingPages(runs)
        except ValueError as e:
            raise ImageError(f"{self.name}: bad page list: {e}") from None

    def pending(self) -> PendingPages:
        return self._pending.copy()

    def address(self, file_index: int, npages: int) -> int:
        if self._verify:
            first = file_index // PAGES_PER_CHUNK
            last = (file_index + npages - 1) // PAGES_PER_CHUNK
            v = self._verified
            if last >= len(v) or v.find(0, first, last + 1) >= 0:
                self._verify_chunks(first, last, file_index)
        try:
            return self._pf.address(file_index)
        except ImageError as e:
            raise PageSourceLost(f"{self.name}: {e}") from e

    def _verify_chunks(self, first: int, last: int, file_index: int) -> None:
        v = self._verified
        if last >= len(v):
            v.extend(bytes(last + 1 - len(v)))
        for chunk in range(first, last + 1):
            if v[chunk]:
                continue
            try:
                self._pf.verify_chunk_for(max(file_index, chunk * PAGES_PER_CHUNK))
            except ImageError as e:
                raise PageSourceLost(f"{self.name}: {e}") from e
            except OSError as e:
                raise PageSourceLost(f"{self.name}: cannot read: {e.strerror}") from e
            v[chunk] = 1

    def prefetch(self, file_index: int, npages: int) -> None:
        """Nothing to do ahead for a local file (see the class docstring)."""

    def close(self) -> None:
        """The PageFile belongs to the image: it is not closed here."""


__all__ = ["ImagePageSource", "PAGES_PER_CHUNK", "PageFileLike", "PageSource"]
