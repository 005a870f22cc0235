"""safetensors shards read and written one tensor at a time (the larger-than-memory path).

`Checkpoint` reads single tensors of a folder's shards with plain file reads into fresh tensors (no mmap: a
mapping keeps every page it touched resident until it is closed). `ShardWriter` collects tensors as they are
produced in a spill file on disk and lays them out at the end exactly as `common.save_tensors` does for the same
dict: the same shard split, the same safetensors headers and data order, so the bytes are identical.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hubquant.formats.common import MAX_SHARD_BYTES

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
    "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are: file, absolute byte range, dtype name and shape."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, Entry], dict]:
    """The tensor entries (absolute offsets) and the metadata of one safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", {}) or {}
    base = 8 + n
    entries = {k: Entry(Path(path), v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0],
                        base + v["data_offsets"][1]) for k, v in header.items()}
    return entries, meta


class Checkpoint:
    """The safetensors tensors of a model folder (`model.safetensors` or the shards of its index)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else [p.name for p in sorted(folder.glob("*.safetensors"))]
        self.entries: dict[str, Entry] = {}
        for name in files:
            self.entries.update(read_header(folder / name)[0])

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self):
        return self.entries.keys()

    def read(self, key: str) -> torch.Tensor:
        """A fresh CPU tensor with the stored dtype and shape."""
        e = self.entries[key]
        t = torch.empty(e.shape, dtype=DTYPES[e.dtype])
        if e.nbytes:
            with open(e.path, "rb", buffering=0) as f:
                f.seek(e.start)
                view = memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")
                got = f.readinto(view)
                if got != e.nbytes:
                    raise OSError(f"{e.path}: short read of {key} ({got} of {e.nbytes} bytes)")
        return t


_RANKS: dict[str, int] | None = None


def dtype_ranks() -> dict[str, int]:
    """safetensors' data order: by dtype (the library's enum order, descending), then by name. Taken from the
    installed library itself by serializing one element of every dtype."""
    global _RANKS
    if _RANKS is None:
        from safetensors.torch import save

        probe = {name: torch.zeros(1, dtype=dt) for name, dt in DTYPES.items()}
        raw = save(probe)
        n = struct.unpack("<Q", raw[:8])[0]
        order = [k for k in json.loads(raw[8: 8 + n]) if k != "__metadata__"]  # data order = dtype descending
        _RANKS = {name: len(order) - i for i, name in enumerate(order)}
    return _RANKS


def safetensors_header(entries: dict[str, tuple[str, tuple[int, ...], int]], metadata: dict) -> tuple[bytes, list[str]]:
    """Header bytes (length prefix included) and data order of a file of `entries` {name: (dtype, shape, nbytes)},
    as safetensors writes them: order by dtype descending then name, compact JSON, space padding to 8 bytes."""
    ranks = dtype_ranks()
    order = sorted(entries, key=lambda k: (-ranks[entries[k][0]], k))
    head: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for k in order:
        dtype, shape, nbytes = entries[k]
        head[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, order


class ShardWriter:
    """Tensors added one at a time (spilled to disk at once), written at `finish` as `save_tensors` would."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.spill_path = self.out_dir / ".hubquant-spill"
        self._spill = open(self.spill_path, "wb")
        self.records: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, offset, nbytes
        self._offset = 0

    def __contains__(self, name: str) -> bool:
        return name in self.records

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.records:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().cpu().contiguous()
        raw = t.view(-1).view(torch.uint8).numpy() if t.numel() else b""
        self._spill.write(raw)
        nbytes = t.numel() * t.element_size()
        self.records[name] = (NAMES[t.dtype], tuple(t.shape), self._offset, nbytes)
        self._offset += nbytes

    def add_file(self, path: Path, skip=()) -> None:
        """Add every tensor of a safetensors file (bytes copied as they are), except the names in `skip`."""
        entries, _ = read_header(path)
        with open(path, "rb") as src:
            for name, e in entries.items():
                if name in skip:
                    continue
                if name in self.records:
                    raise ValueError(f"tensor {name} written twice")
                self._spill.flush()
                _copy(src.fileno(), e.start, self._spill.fileno(), e.nbytes)
                self._spill.seek(0, os.SEEK_END)
                self.records[name] = (e.dtype, e.shape, self._offset, e.nbytes)
                self._offset += e.nbytes

    def finish(self, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
        """Write `model.safetensors` (or shards + index) into the folder; remove the spill. Returns the file names."""
        self._spill.close()
        meta = {"format": "pt"}
        total = sum(r[3] for r in self.records.values())
        shards: list[list[str]] = [[]]
        cur = 0
        for key in sorted(self.records):  # the split of common.save_tensors
            size = self.records[key][3]
            if shards[-1] and cur + size > max_shard_bytes:
                shards.append([])
                cur = 0
            shards[-1].append(key)
            cur += size
        single = total <= max_shard_bytes
        names = ["model.safetensors"] if single else \
            [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
        if single:
            shards = [sorted(self.records)]
        with open(self.spill_path, "rb") as spill:
            for name, keys in zip(names, shards):
                head, order = safetensors_header({k: self.records[k][:2] + (self.records[k][3],) for k in keys}, meta)
                with open(self.out_dir / name, "wb") as out:
                    out.write(head)
                    out.flush()
                    for k in order:
                        _copy(spill.fileno(), self.records[k][2], out.fileno(), self.records[k][3])
                        out.seek(0, os.SEEK_END)
        self.spill_path.unlink()
        if not single:
            weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names

    def abort(self) -> None:
        self._spill.close()
        self.spill_path.unlink(missing_ok=True)


def _copy(src_fd: int, src_off: int, dst_fd: int, nbytes: int, chunk: int = 64 << 20) -> None:
    """Append `nbytes` of `src_fd` at `src_off` to `dst_fd` (kernel copy where the OS has one)."""
    dst_off = os.lseek(dst_fd, 0, os.SEEK_END)
    done = 0
    while done < nbytes:
        n = min(chunk, nbytes - done)
        try:
            got = os.copy_file_range(src_fd, dst_fd, n, src_off + done, dst_off + done)
        except (AttributeError, OSError):
            data = os.pread(src_fd, n, src_off + done)
            got = os.pwrite(dst_fd, data, dst_off + done)
        if got <= 0:
            raise OSError(f"copy stopped after {done} of {nbytes} bytes")
        done += got
    os.lseek(dst_fd, dst_off + nbytes, os.SEEK_SET)
