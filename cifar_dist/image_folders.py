"""An image folder's files: train/<class>/<image> and test/<class>/<image>, read from a folder or
from a tar archive of one (plain, gzip, bzip2 or xz), checked whole before anything is used.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

from cifar_dist.errors import DataError
from cifar_dist.images import IMAGE_SUFFIXES

Members = dict[str, dict[str, list[tuple[str, bytes | Path]]]]  # split -> class -> [(name, bytes or path)]


def folder_members(root: Path) -> Members:
    """The image files under `root`/train/<class>/ and `root`/test/<class>/, each class's sorted by name."""
    out: Members = {}
    for split in ("train", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        out[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            out[split][class_name(class_dir.name)] = [(str(p), p) for p in images]
    return out


def class_name(name: str) -> str:
    """A class's name from its folder's name, decoded as UTF-8 whatever the locale: under LC_ALL=C
    without Python's UTF-8 mode a file name's non-ASCII bytes arrive as lone surrogates, which no
    plot or JSON reader shows, and the same data would get other names in another locale."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


def tar_members(path: Path) -> Members:
    """The images under any .../train/<class>/ and .../test/<class>/ of the archive, read into memory."""
    out: Members = {}
    raw = unpacked(path)
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            for m in tar:
                # Any leading folder is accepted: .../train/<class>/<file>, .../test/<class>/<file>.
                parts = Path(m.name).parts
                if m.isdir() and len(parts) >= 2 and parts[-2] in ("train", "test"):
                    out.setdefault(parts[-2], {}).setdefault(class_name(parts[-1]), [])
                elif (m.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test")
                      and Path(m.name).suffix.lower() in IMAGE_SUFFIXES):
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    out.setdefault(parts[-3], {}).setdefault(class_name(parts[-2]), []).append((f"{path}:{m.name}", data))
            end = tar.offset  # where the member headers stopped
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from None
    # tarfile ends without a word at a damaged header; a whole archive has only zero blocks after its last member.
    if raw[end:].strip(b"\0"):
        raise DataError(f"{path}: damaged tar archive (no valid member header at byte {end:,} of {len(raw):,} "
                        "unpacked); nothing was used")
    for by_class in out.values():
        for items in by_class.values():
            items.sort(key=lambda item: item[0])
    return out


# First bytes of a compressed archive -> its decompressor; each checks its stream's checksum and length.
DECOMPRESSORS: dict[bytes, Callable[[bytes], bytes]] = {b"\x1f\x8b": gzip.decompress, b"BZh": bz2.decompress,
                                                        b"\xfd7zXZ\x00": lzma.decompress}


def unpacked(path: Path) -> bytes:
    """The archive's tar bytes, decompressed in memory as a whole: tarfile reading a stream checks
    no gzip CRC unless it reads to the end, so a damaged archive could otherwise pass for a shorter one."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    decompress = next((d for magic, d in DECOMPRESSORS.items() if data.startswith(magic)), None)
    if decompress is None:
        return data  # a plain .tar: its headers carry checksums, its contents none
    try:
        return decompress(data)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise DataError(f"{path}: damaged archive ({type(e).__name__}: {e}); nothing was used") from None
