"""The image directory: format "lazarus-image" v1, written atomically, validated on open (docs/IMAGES.md).

Pure Python: plain file I/O and mmap only. The one link to the kernel layer is PageFile.address(), which
imports its address helper on first use.
"""

from lazarus.images.format import (
    CHUNK_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    INVENTORY_SCHEMA,
    PAGE_SIZE,
    PAGES_PER_CHUNK,
    TASK_SCHEMA,
    blob_name,
    pages_name,
    sums_name,
    task_name,
)
from lazarus.images.reader import Image, PageFile, validate_task

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lazarus.images.writer import ImageWriter, PagesWriter


def __getattr__(name: str) -> object:
    # The writer (tempfile, shutil, compression modules) on first use: a restore never writes an image.
    if name in ("ImageWriter", "PagesWriter"):
        from lazarus.images import writer
        return getattr(writer, name)
    raise AttributeError(f"module 'lazarus.images' has no attribute {name!r}")

__all__ = [
    "CHUNK_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INVENTORY_SCHEMA",
    "PAGE_SIZE",
    "PAGES_PER_CHUNK",
    "TASK_SCHEMA",
    "Image",
    "ImageWriter",
    "PageFile",
    "PagesWriter",
    "blob_name",
    "pages_name",
    "sums_name",
    "task_name",
    "validate_task",
]
