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
from lazarus.images.writer import ImageWriter, PagesWriter

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
