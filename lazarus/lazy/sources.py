"""Where lazily restored pages come from.

A `PageSource` knows the pending pages of one address space (as found in the image) and hands out, for a run
of file pages, the address in *our* address space holding their bytes, ready for UFFDIO_COPY: the server never
copies page data through Python.

    ImagePageSource     pages-PID.img mapped read-only (images.PageFile); every 64 KiB chunk is checked against
                        its checksum before a page of it is first served (ahead, by a verifier process, when
                        the page file is large); pages served are dropped from the mapping every DROP_BYTES.
                        One mapping and one verifier may serve many restores of one page file (pagefiles.py).
    RemotePageSource    (future) a page server over a socket: `synchronous` is False, the server asks with
                        request() and learns of arrivals through fileno() becoming readable, then collect().
                        The server's loop already treats sources as things that may fail (PageSourceLost) and
                        keys its work by file page index, which is what such a request carries.

A source failure (checksum mismatch, truncated or unreadable page file, a lost connection) is reported as
`PageSourceLost`: the served process must then be killed, never left to run on zero-filled memory.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping

from lazarus.errors import ImageError, KernelError, PageSourceLost
from lazarus.images.mm import huge_ranges
from lazarus.kernel.abi import MADV_DONTNEED
from lazarus.kernel.vm import madvise
from lazarus.lazy.ranges import PAGE_SIZE, PendingPages
from lazarus.logs import getLogger

CHUNK_BYTES = 65536
PAGES_PER_CHUNK = CHUNK_BYTES // PAGE_SIZE
log = getLogger(__name__)


TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any, Protocol

    class PageFileLike(Protocol):
        """What ImagePageSource needs of lazarus.images.PageFile."""

        def address(self, file_page_index: int) -> int: ...

        def verify_chunk_for(self, page_index: int) -> None: ...


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

        def served(self, file_index: int, npages: int) -> None:
            """These file pages were copied into a process: the source may let go of them (a local file source
            drops them from its mapping, so that the server's RSS does not grow with what it has served)."""
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
            inline (xxh3, ~14 GB/s here, holding the GIL) costs ~15-25% of the background rate; so while a
            background transfer runs, an AheadVerifier process checks chunks a bounded distance ahead on the
            other CPU, and the server hashes inline only what it has not reached (faults elsewhere, or no
            background transfer).
    """

    synchronous = True
    VERIFY_AHEAD_MIN = 128 << 20
    # Pages copied out of the mapping are dropped from it (MADV_DONTNEED: out of our page tables, still in the
    # page cache) once this many bytes were served, so that the server's RssFile stays flat in the size of
    # what it serves. 8 MiB: the madvise costs <1% of the copying it follows (docs/BENCHMARKS.md).
    DROP_BYTES = 8 << 20

    def __init__(self, vmas: Iterable[Mapping[str, Any]], page_file: PageFileLike, *, name: str = "",
                 verify: bool = True, on_close: Callable[[], None] | None = None,
                 shared_verifier: SharedVerifier | None = None) -> None:
        self.name = name or str(getattr(page_file, "name", "page file"))
        self._shared_verifier = shared_verifier  # one verifier for every source on one mapping (pagefiles.py)
        self._on_close = on_close  # a lease on a shared mapping of the page file (pagefiles.py), released once
        self._pf = page_file
        self._verify = verify
        self._verified = bytearray()  # one byte per 64 KiB chunk: 1 once its checksum matched
        self._verifier: AheadVerifier | None = None
        self.checked_ahead = self.checked_inline = 0  # chunks, for the stats
        self.verified_ahead = False  # whether a verify-ahead process was started
        self._held = 0              # pages served since the last drop, between file pages _held_lo and _held_hi
        self._held_lo = self._held_hi = 0
        self.dropped_bytes = 0      # of the mapping, for the stats
        runs = []
        vmas = list(vmas)
        # Ranges the task held in huge pages: collapsed again once complete (restore/thp.py).
        self.huge = huge_ranges(vmas)  # type: ignore[arg-type]
        for vma in vmas:
            for vaddr, npages, fidx in vma.get("pages", ()):
                runs.append((int(vaddr), int(npages), int(fidx)))
        try:
            self._pending = PendingPages(runs)
        except ValueError as e:
            raise ImageError(f"{self.name}: bad page list: {e}") from None

    def pending(self) -> PendingPages:
        return self._pending.copy()

    def drop(self, start: int, end: int) -> int:
        """Leave the pages of [start, end) out of what this source serves from now on (an adopted process has
        them already); returns how many of its pages that was."""
        return self._pending.remove(start, end)

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

    def why_unreadable(self) -> str | None:
        """What is wrong with the page file, now that a copy from it failed (None: nothing seen)."""
        try:
            self._pf.check_size()
        except ImageError as e:
            return f"{self.name}: {e}"
        return None

    def _verify_chunks(self, first: int, last: int, file_index: int) -> None:
        v = self._verified
        if last >= len(v):
            v.extend(bytes(last + 1 - len(v)))
        ahead = self._verifier
        for chunk in range(first, last + 1):
            if v[chunk]:
                continue
            if ahead is not None:
                state = ahead.state(chunk)
                if state == AheadVerifier.BAD:
                    raise PageSourceLost(f"{self.name}: chunk {chunk} does not match its checksum")
                if state == AheadVerifier.GOOD:
                    v[chunk] = 1
                    ahead.used()
                    self.checked_ahead += 1
                    continue
            try:
                self._pf.verify_chunk_for(max(file_index, chunk * PAGES_PER_CHUNK))
            except ImageError as e:
                raise PageSourceLost(f"{self.name}: {e}") from e
            except OSError as e:
                raise PageSourceLost(f"{self.name}: cannot read: {e.strerror}") from e
            v[chunk] = 1
            self.checked_inline += 1
            if ahead is not None:
                ahead.used()

    def prefetch(self, file_index: int, npages: int) -> None:
        """Nothing to do ahead for a local file (see the class docstring)."""

    def served(self, file_index: int, npages: int) -> None:
        if self._held:
            if file_index < self._held_lo:
                self._held_lo = file_index
            if file_index + npages > self._held_hi:
                self._held_hi = file_index + npages
        else:
            self._held_lo, self._held_hi = file_index, file_index + npages
        self._held += npages
        if self._held * PAGE_SIZE >= self.DROP_BYTES:
            self.drop_served()

    def drop_served(self) -> None:
        """Drop the pages served since the last drop from our mapping of the page file. The range spans
        whatever lies between them (scattered faults): pages of it used again are found in the page cache."""
        if not self._held:
            return
        lo, n = self._held_lo, self._held_hi - self._held_lo
        self._held = 0
        with contextlib.suppress(ImageError, KernelError):  # a closed or truncated file: nothing mapped to drop
            madvise(self._pf.address(lo), n * PAGE_SIZE, MADV_DONTNEED)
            self.dropped_bytes += n * PAGE_SIZE

    def start(self, background: bool = True) -> None:
        """Called by the server (single-threaded, before its loop): check chunks ahead in a verifier process,
        on the other CPU. With a background transfer the verifier keeps a bounded distance ahead of it; without
        one, faults come anywhere and a fault on a chunk nobody checked yet would wait for its hash (~5-18 us,
        most of the server's own latency per fault): the verifier then checks the whole file, unpaced."""
        # Below VERIFY_AHEAD_MIN the fork costs more than the hashing it would take off the server.
        if (self._verify and self._verifier is None and hasattr(self._pf, "chunk_matches")
                and self._pending.pages * PAGE_SIZE >= self.VERIFY_AHEAD_MIN):
            lead = AheadVerifier.LEAD if background else None
            if self._shared_verifier is not None:
                self._verifier = self._shared_verifier.acquire(self._pf, lead)
            else:
                self._verifier = AheadVerifier.start(self._pf, lead=lead)
            self.verified_ahead = self._verifier is not None

    def close(self) -> None:
        """The PageFile belongs to the image (or to a shared mapping, released here): it is not closed here;
        the verifier, if any, is stopped. Idempotent."""
        self.drop_served()
        if self._verifier is not None:
            log.debug("%s: %d chunks checked ahead, %d inline", self.name, self.checked_ahead, self.checked_inline)
            if self._shared_verifier is not None:
                self._shared_verifier.release()
            else:
                self._verifier.stop()
            self._verifier = None
        if self._on_close is not None:
            release, self._on_close = self._on_close, None
            release()


class SharedVerifier:
    """One verify-ahead process for a page file mapped once and served to several restores (pagefiles.py):
    they share its mapping and its bitmap of verified chunks, so one process hashing ahead serves them all. It
    is started by the first source that wants one (its pacing, bounded or not, is that source's) and stopped
    when the last source using it is closed."""

    def __init__(self) -> None:
        self.verifier: AheadVerifier | None = None
        self.users = 0

    def acquire(self, pf: Any, lead: int | None) -> AheadVerifier | None:
        if self.verifier is None:
            self.verifier = AheadVerifier.start(pf, lead=lead)
        if self.verifier is not None:
            self.users += 1
        return self.verifier

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0 and self.verifier is not None:
            self.verifier.stop()
            self.verifier = None


class AheadVerifier:
    """Checks page-file chunks in a forked process, a bounded distance ahead of what the server has used.

    Hashing inline costs the single-threaded server ~15-25% of its background rate (xxh3 holds the GIL, so a
    thread cannot help); a process on the other CPU takes it off the critical path. It stays at most `LEAD`
    chunks ahead of the server, so a chunk is checked shortly before it is copied (the page file could change
    under us; see docs/IMAGES.md). It shares with the server one byte of state per chunk and a counter of the
    chunks the server used; it holds no fd at all (the page file is reached through the inherited mapping), so
    it can never keep a uffd or a socket of the server alive.
    """

    UNKNOWN, GOOD, BAD = 0, 1, 2
    LEAD = 1024  # chunks: 64 MiB, ~25 ms of copying
    DROP_CHUNKS = 128  # hashed chunks dropped from its mapping 8 MiB at a time

    def __init__(self, pid: int, shm: mmap.mmap, n: int) -> None:
        self.pid = pid
        self._shm = shm
        self._n = n
        self._used = 0

    @classmethod
    def start(cls, pf: Any, lead: int | None = LEAD) -> AheadVerifier | None:
        """Fork the verifier; it stays at most `lead` chunks ahead of the server's use (None: no bound)."""
        n = pf.nchunks
        if n == 0:
            return None
        shm = mmap.mmap(-1, 8 + n)  # [u64 chunks used by the server][one state byte per chunk]
        parent = os.getpid()
        base = pf.address(0)  # (before the fork: the child makes no call that could need a lock)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the verifier process; its effect is tested through the server
            code = 0
            try:
                gc.disable()
                os.closerange(0, 1 << 16)
                for chunk in range(n):
                    while lead is not None and chunk - int.from_bytes(shm[:8], "little") > lead:
                        if os.getppid() != parent:
                            os._exit(0)
                        time.sleep(0.0005)
                    shm[8 + chunk] = cls.GOOD if pf.chunk_matches(chunk) else cls.BAD
                    if chunk % cls.DROP_CHUNKS == cls.DROP_CHUNKS - 1:
                        # what it has hashed leaves its page tables: its RSS stays flat too
                        first = chunk + 1 - cls.DROP_CHUNKS
                        with contextlib.suppress(KernelError):  # (a last chunk shorter than 64 KiB)
                            madvise(base + first * CHUNK_BYTES, cls.DROP_CHUNKS * CHUNK_BYTES, MADV_DONTNEED)
            except BaseException:  # noqa: BLE001 - whatever it could not check, the server checks itself
                code = 1
            finally:
                os._exit(code)
        return cls(pid, shm, n)

    def state(self, chunk: int) -> int:
        return self._shm[8 + chunk] if chunk < self._n else self.UNKNOWN

    def used(self) -> None:
        self._used += 1
        self._shm[:8] = self._used.to_bytes(8, "little")

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._shm.close()


__all__ = ["ImagePageSource", "PAGES_PER_CHUNK", "PageFileLike", "PageSource", "SharedVerifier"]
