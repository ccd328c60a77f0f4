"""Readers of compiled device code inside exported libraries (fatbins, CUDA cubins, ELF headers).

Pure Python, no TVM and no torch: ``gmorph-tvm info`` and the loader's host-architecture check use
them. Layouts (all little endian):

* fatbin: header ``<magic 0xBA55ED50:u32> <version:u16> <header size:u16> <size:u64>``, then
  entries ``<kind:u16 (1 PTX, 2 ELF)> <ver:u16> <header size:u32> <payload size:u64>`` with the
  SM number as a u32 at entry offset 28;
* CUDA cubin: an ELF file with ``e_machine`` EM_CUDA whose ``e_flags`` hold the SM number.
"""

from __future__ import annotations

import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FATBIN_MAGIC = 0xBA55ED50
ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
EM_AARCH64 = 183
EM_X86_64 = 62


def u32_at(data: bytes, offset: int) -> int:
    """The little-endian u32 at ``offset``, or -1 past the end."""
    return struct.unpack_from("<I", data, offset)[0] if len(data) >= offset + 4 else -1


@dataclass(frozen=True)
class DeviceImage:
    kind: str  # "elf" (SASS cubin) or "ptx"
    sm: int


def cubin_sm(elf: bytes) -> int | None:
    """SM number of a CUDA ELF (e_machine EM_CUDA), or None if ``elf`` is not one."""
    if elf[:4] != ELF_MAGIC or len(elf) < 52 or struct.unpack_from("<H", elf, 18)[0] != EM_CUDA:
        return None
    flags = struct.unpack_from("<I", elf, 48)[0]
    # CUDA ELF ABI version >= 8 (CUDA 12.8+) moved the SM number from bits 0-7 to bits 8-15.
    return (flags >> 8) & 0xFF if elf[8] >= 8 else flags & 0xFF


def fatbin_images(data: bytes, offset: int = 0) -> list[DeviceImage]:
    """The images (SASS ELF / PTX, with SM) of the fatbin starting at ``offset`` in ``data``."""
    if u32_at(data, offset) != FATBIN_MAGIC:
        raise ValueError("not a fatbin")
    header_size = struct.unpack_from("<H", data, offset + 6)[0]
    (fat_size,) = struct.unpack_from("<Q", data, offset + 8)
    pos, end = offset + header_size, offset + header_size + fat_size
    images = []
    while pos + 32 <= min(end, len(data)):
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, pos)
        sm = struct.unpack_from("<I", data, pos + 28)[0]
        if entry_header == 0:
            break
        images.append(DeviceImage({1: "ptx", 2: "elf"}.get(kind, str(kind)), sm))
        pos += entry_header + payload
    return images


def device_images_in_file(path: str | os.PathLike) -> list[DeviceImage]:
    """Every fatbin image and bare CUDA cubin inside ``path``: a .so, an object, or a (gzipped)
    tar of objects as ``export_library`` writes for ``.tar``."""
    if tarfile.is_tarfile(path):
        images: list[DeviceImage] = []
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                data = archive.extractfile(member) if member.isfile() else None
                if data is not None:
                    images.extend(device_images_in_bytes(data.read()))
        return images
    return device_images_in_bytes(Path(path).read_bytes())


def device_images_in_bytes(data: bytes) -> list[DeviceImage]:
    images: list[DeviceImage] = []
    magic = struct.pack("<I", FATBIN_MAGIC)
    start = data.find(magic)
    fatbin_spans = []
    while start != -1:
        try:
            found = fatbin_images(data, start)
            images.extend(found)
            fatbin_spans.append((start, start + 16 + struct.unpack_from("<Q", data, start + 8)[0]))
        except (ValueError, struct.error):
            pass
        start = data.find(magic, start + 4)
    start = data.find(ELF_MAGIC, 1)
    while start != -1:
        if not any(a <= start < b for a, b in fatbin_spans):
            sm = cubin_sm(data[start:start + 64])
            if sm is not None:
                images.append(DeviceImage("elf", sm))
        start = data.find(ELF_MAGIC, start + 4)
    return images


def elf_machine(path: str | os.PathLike) -> int | None:
    """e_machine of an ELF file, or None for something else (e.g. a .tar)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != ELF_MAGIC or len(head) < 20:
        return None
    return struct.unpack_from("<H", head, 18)[0]


def describe_device_code(library: str | Path) -> dict[str, Any]:
    """Summary of the CUDA device code inside an exported library (for reports and tests)."""
    images = device_images_in_file(library)
    return {
        "sass": sorted({f"sm_{img.sm}" for img in images if img.kind == "elf"}),
        "ptx": sorted({f"compute_{img.sm}" for img in images if img.kind == "ptx"}),
    }
