"""One mapping of each page file per lazy server, shared by every restore of that image it serves.

A server serving several restores of one image at once (one image restored many times, e.g. each into its own
pid namespace) maps each page file once. The page cache is the kernel's and shared anyway; one mapping also
means one set of the server's page tables over it (dropped behind the copies, see sources.py) and one bitmap of
verified chunks and one verify-ahead process, so a chunk hashed for one restore is not hashed again for the next.

Identity is PageFile.identity: the file's device, inode and size and a hash of its chunk sums. Another path or a
hard link to the same file is the same page file; the same path dumped again is another file (a new inode), and
so is a file whose sums differ (never served from a mapping checked against other sums).

    src = files.source(vmas, image.page_file(pid), name=...)   # an ImagePageSource on the shared mapping
    ...                                                        # the server closes src when its last process
                                                               # is done: the last user of a mapping unmaps it
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lazarus.lazy.sources import ImagePageSource, SharedVerifier
from lazarus.logs import getLogger

TYPE_CHECKING = False  # typing is not imported at run time (start-up cost)
if TYPE_CHECKING:
    from typing import Any

log = getLogger(__name__)

Identity = tuple[int, int, int, int]


class _Mapping:
    __slots__ = ("page_file", "users", "verifier")

    def __init__(self, page_file: Any) -> None:
        self.page_file = page_file
        self.users = 0
        self.verifier = SharedVerifier()  # one verify-ahead process for all the sources on this mapping


class MappedPageFiles:
    """The page files one lazy server has mapped, each once, with the number of sources using it."""

    def __init__(self) -> None:
        self._maps: dict[Identity, _Mapping] = {}

    def source(self, vmas: Iterable[Mapping[str, Any]], page_file: Any, *, name: str = "",
               verify: bool = True) -> ImagePageSource:
        """An ImagePageSource for `vmas` served from the mapping of `page_file`'s data: `page_file` itself if
        no mapping of that file is held yet, else the one held (and `page_file`, a second mapping of the same
        data, is closed). The mapping is released when the source is closed."""
        key = page_file.identity
        if key is None:  # nothing mapped (a task without page data): nothing to share
            return ImagePageSource(vmas, page_file, name=name, verify=verify)
        m = self._maps.get(key)
        if m is None or m.page_file.closed:
            m = self._maps[key] = _Mapping(page_file)
        elif m.page_file is not page_file:
            page_file.close()
            log.debug("%s: served from the mapping already held for that file", name or page_file.name)
        m.users += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(key, m)
        return ImagePageSource(vmas, m.page_file, name=name, verify=verify, on_close=release,
                               shared_verifier=m.verifier)

    def _release(self, key: Identity, m: _Mapping) -> None:
        m.users -= 1
        if m.users <= 0:
            if self._maps.get(key) is m:
                del self._maps[key]
            m.page_file.close()  # unmapped (a view still alive keeps it until released)

    @property
    def mapped(self) -> int:
        """How many page files are mapped now."""
        return len(self._maps)

    def users(self, page_file: Any) -> int:
        """How many sources use the mapping of `page_file`'s data now (0: none held)."""
        key = page_file.identity
        m = self._maps.get(key) if key is not None else None
        return m.users if m is not None else 0


__all__ = ["MappedPageFiles"]
