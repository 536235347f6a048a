"""Stage 1, intake: find the images, verify each one fully, keep those large enough.

Verification decodes every pixel (a truncated JPEG passes PIL's `verify()` but not this). Its
result is stored under (path, size, mtime), so a resumed run does not decode the images again.
The same picture found twice (same SHA-1) is used once. Sharding goes by the path relative to
its folder, so every machine agrees on the split without reading other shards' files.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from zoomless.imaging import ImageError, load_image
from zoomless.synth.config import IntakeConfig, SynthError
from zoomless.synth.store import Store


@dataclass(frozen=True)
class ImageInfo:
    path: Path  # absolute
    sha1: str  # of the file bytes: the image's identity in every key
    width: int
    height: int


def find_images(sources: list[Path], extensions: list[str]) -> list[tuple[Path, str]]:
    """(absolute path, shard name) of every image: folders walked recursively and sorted, files as given."""
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    found: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for src in sources:
        src = Path(src)
        if src.is_dir():
            paths = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in exts)
            named = [(p.resolve(), p.relative_to(src).as_posix()) for p in paths]
        elif src.is_file():
            named = [(src.resolve(), src.name)]
        else:
            raise SynthError(f"images: no such folder or file: {src}")
        for path, name in named:
            if path not in seen:
                seen.add(path)
                found.append((path, name))
    return found


def in_shard(name: str, shard: tuple[int, int]) -> bool:
    i, n = shard
    return n == 1 or int(hashlib.sha1(name.encode()).hexdigest(), 16) % n == i


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, max_pixels: int) -> dict:
    """{"sha1", "width", "height"} of a fully decodable image, else {"error": one line}."""
    try:
        with load_image(path, max_pixels=max_pixels) as im:
            width, height = im.size
    except ImageError as e:
        return {"error": str(e)}
    return {"sha1": file_sha1(path), "width": width, "height": height}


def intake(
    sources: list[Path], cfg: IntakeConfig, store: Store, seed: int, shard: tuple[int, int]
) -> tuple[list[ImageInfo], list[tuple[str, str]]]:
    """The usable images of this shard, and (path, reason) for every file dropped."""
    found = find_images(sources, cfg.extensions)
    if cfg.max_images is not None and len(found) > cfg.max_images:
        picked = set(random.Random(seed).sample(range(len(found)), cfg.max_images))
        found = [f for i, f in enumerate(found) if i in picked]
    images: list[ImageInfo] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path, name in found:
        if not in_shard(name, shard):
            continue
        stat = path.stat()
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        rec = store.get("intake", key)
        if rec is None:
            rec = verify(path, cfg.max_pixels)
            store.put("intake", [(key, rec)])
        if "error" in rec:
            dropped.append((str(path), "unreadable image"))
        elif rec["width"] < cfg.min_width or rec["height"] < cfg.min_height:
            dropped.append((str(path), f"smaller than {cfg.min_width}x{cfg.min_height}"))
        elif rec["sha1"] in seen:
            dropped.append((str(path), "duplicate of another image"))
        else:
            seen.add(rec["sha1"])
            images.append(ImageInfo(path, rec["sha1"], rec["width"], rec["height"]))
    return images, dropped
