"""Image files on disk: which ones are usable, and reading one. A leaf of ``kd.data``: the labelled image
folders (``kd.data.imagefolder``) and the unlabeled ones (``kd.data.unlabeled``) both sort their files with it.

Bad files (unreadable, empty, not an image) are found twice: at setup, every file's first bytes are checked
against the image formats torchvision reads (in parallel threads: it costs a small read per file, not a
decode), and when a file fails to decode during the run (a truncated JPEG passes the header check).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

log = logging.getLogger("kd")

BAD_IMAGE_POLICIES = ("stop", "skip")
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def visible(name: str) -> bool:
    return not name.startswith(".")


def looks_like_image(head: bytes) -> bool:
    """The first bytes of a JPEG, PNG, GIF, BMP, TIFF, WebP or PNM (ppm/pgm) file."""
    if head.startswith(SIGNATURES):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return head[:1] == b"P" and head[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6") and head[2:3].isspace()


def image_problem(path: str) -> str | None:
    """Why ``path`` is not a usable image file, or None. Reads its first 12 bytes only."""
    if not path.lower().endswith(IMG_EXTENSIONS):
        return "is not an image file (by its extension)"
    try:
        with open(path, "rb") as file:
            head = file.read(12)
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    if not head:
        return "is empty"
    if not looks_like_image(head):
        return "is not an image (its first bytes match no image format)"
    return None


def image_problems(paths: list[str]) -> list[str | None]:
    """``image_problem`` of every file, read in threads: opening many small files is I/O-bound."""
    with ThreadPoolExecutor(max_workers=min(32, 4 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(image_problem, paths, chunksize=256))


def readable_samples(candidates: list[tuple[str, int]], problems: list[str | None], dataset: Any, root: str) -> list:
    """The (path, target) samples whose file has no problem. Each bad one goes to ``dataset.handle`` (which stops
    the run, or records it in ``dataset.skipped`` under data.bad_images=skip); the skipped are logged once."""
    samples = []
    for (path, target), problem in zip(candidates, problems, strict=True):
        if problem is None:
            samples.append((path, target))
        else:
            dataset.handle(BadImage(path, problem))
    if dataset.skipped:
        log.warning(
            "data.bad_images=skip: left out %d unreadable or non-image files under %s (first: %s %s)",
            len(dataset.skipped),
            root,
            *next(iter(dataset.skipped.items())),
        )
    return samples


class BadImage(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


def load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as file:
            return Image.open(file).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise BadImage(path, f"cannot be decoded ({type(error).__name__}: {error})") from None
