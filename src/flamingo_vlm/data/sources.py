"""Where records come from: webdataset tar shards, jsonl files, parquet files.

A *source* turns one shard (a file or URL) into a stream of raw records (undecoded: bytes, json text,
parquet row dicts), and can start ``skip`` records in without decoding them, which is how a run resumes.
:func:`read_records` fetches given records of a shard (a resumed shuffle buffer's).

A local tar shard is indexed once per process (:func:`tar_index`: the byte offset of each record,
from the tar headers alone), so both seek straight to a record instead of reading the shard up to it.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import os
import re
import tarfile
import threading
import zipfile
from array import array
from collections import OrderedDict
from typing import Iterable, Iterator, Sequence

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, group_by_keys, meta_prefix, meta_suffix, tar_file_iterator

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://")


class ShardError(Exception):
    """A shard could not be read (missing, truncated, not the expected format)."""


def expand_paths(paths: Sequence[str], extensions: Sequence[str], data_root: str | None = None,
                 exclude_dirs: Sequence[str] = ()) -> list[str]:
    """Files/URLs from config entries: plain paths, globs (``*``), brace ranges (``{000..099}``),
    directories (their files with one of ``extensions``, sorted) and remote URLs (kept as they are).

    exclude_dirs: folder name patterns (fnmatch) a directory walk does not enter, e.g. the opt-out
    versions beside OBELICS's ``data/`` (name such a folder itself to read it)."""
    out: list[str] = []
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if entry.startswith(REMOTE_PREFIXES):
            out.extend(expand_urls(entry))
            continue
        if data_root and not os.path.isabs(entry):
            entry = os.path.join(data_root, entry)
        for item in expand_urls(entry):
            if any(c in item for c in "*?["):
                out.extend(sorted(glob.glob(item, recursive=True)))
            elif os.path.isdir(item):
                out.extend(_walk(item, extensions, exclude_dirs))
            else:
                out.append(item)
    return out


def _walk(root: str, extensions: Sequence[str], exclude_dirs: Sequence[str]) -> list[str]:
    found = []
    suffixes = tuple(f".{e}" for e in extensions)
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, pattern) for pattern in exclude_dirs)]
        found.extend(os.path.join(folder, f) for f in files if f.endswith(suffixes))
    return sorted(found)


# webdataset's tar_file_iterator skips these members (its default skip_meta)
_WDS_SKIP_META = re.compile(r"__[^/]*__($|/)")
_INDEX_CACHE: OrderedDict[tuple, array] = OrderedDict()
_INDEX_CACHE_SIZE = 64  # shards; an index is 8 bytes per record
_INDEX_LOCK = threading.Lock()


def _open_local(path: str):
    """Open a local shard for reading (one place, so tests can count the bytes read)."""
    return open(path, "rb")


def _is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES) and not url.startswith("file:") and url != "-"


def tar_index(path: str) -> array | None:
    """Byte offset of the first member of each record of a local, uncompressed tar shard, grouped as
    webdataset groups them (consecutive regular members sharing the name before the first dot of the
    basename, meta files skipped). Reading it touches only the 512-byte headers (tarfile seeks over the
    contents). Cached per process by (path, size, mtime). None for a compressed or unreadable file:
    the caller then reads the shard from its start, which reports the error where it is."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_size, st.st_mtime_ns)
    with _INDEX_LOCK:
        if key in _INDEX_CACHE:
            _INDEX_CACHE.move_to_end(key)
            return _INDEX_CACHE[key]
    offsets = array("q")
    try:
        with _open_local(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            last = None
            for info in tar:
                tar.members = []  # keep no TarInfo: only the offsets
                name = info.name
                if not info.isreg() or ("/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix)):
                    continue
                if _WDS_SKIP_META.match(name):
                    continue
                prefix, _ = base_plus_ext(name)
                if prefix is None:
                    continue
                if prefix != last:
                    offsets.append(info.offset)
                    last = prefix
    except (OSError, tarfile.TarError, EOFError):
        return None
    with _INDEX_LOCK:
        _INDEX_CACHE[key] = offsets
        while len(_INDEX_CACHE) > _INDEX_CACHE_SIZE:
            _INDEX_CACHE.popitem(last=False)
    return offsets


class TarSource:
    """webdataset tar shards: files sharing a key (``000123.jpg``, ``000123.txt``) form one record
    ``{"__key__", "__url__", ext: bytes}`` (webdataset's own grouping), read as a stream. A local shard
    is entered at a record's byte offset (:func:`tar_index`) rather than read up to it."""

    extensions = ("tar",)

    def _stream(self, url: str, start: int) -> Iterator[dict]:
        """Records from byte ``start`` (a record's first header; 0 for the whole shard) on."""
        try:
            stream = _open_local(url) if _is_local(url) else wds.gopen(url, "rb")
            if start:
                stream.seek(start)
        except Exception as e:  # noqa: BLE001 - a missing or unreachable shard of any kind
            raise ShardError(f"cannot open {url}: {e}") from e
        try:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)
        except Exception as e:  # noqa: BLE001 - tarfile.ReadError, truncated streams, bad headers
            raise ShardError(f"error reading {url}: {e}") from e
        finally:
            stream.close()

    def _index(self, url: str) -> array | None:
        return tar_index(url) if _is_local(url) and not url.endswith((".gz", ".bz2", ".xz", ".zst")) else None

    def records(self, url: str, skip: int = 0) -> Iterator[dict]:
        index = self._index(url) if skip else None
        if index is not None:
            if skip < len(index):
                yield from self._stream(url, index[skip])
            return
        for i, record in enumerate(self._stream(url, 0)):
            if i >= skip:
                yield record

    def read(self, url: str, indices: Sequence[int]) -> Iterator[tuple[int, dict]]:
        """(index, record) for the given sorted record indices, one seek per run of consecutive ones."""
        index = self._index(url)
        if index is None:
            yield from _read_sequentially(self, url, indices)
            return
        wanted = [i for i in indices if i < len(index)]
        k = 0
        while k < len(wanted):
            run = k
            while run + 1 < len(wanted) and wanted[run + 1] == wanted[run] + 1:
                run += 1
            stream = self._stream(url, index[wanted[k]])
            try:
                for i, record in zip(range(wanted[k], wanted[run] + 1), stream):
                    yield i, record
            finally:
                stream.close()
            k = run + 1


def _read_sequentially(source, url: str, indices: Sequence[int]) -> Iterator[tuple[int, dict]]:
    if not indices:
        return
    wanted = set(indices)
    first, last = min(indices), max(indices)
    for i, record in enumerate(source.records(url, skip=first), start=first):
        if i in wanted:
            yield i, record
        if i >= last:
            return


def read_records(source, url: str, indices: Iterable[int]) -> dict[int, dict]:
    """The records at the given indices of one shard ({index: record}; an index past the shard's end is
    missing), with the source's random access where it has one, else one pass from the first."""
    indices = sorted(set(indices))
    reader = getattr(source, "read", None)
    pairs = reader(url, indices) if reader is not None else _read_sequentially(source, url, indices)
    return dict(pairs)


class JsonlSource:
    """One json document per line (``.jsonl``, ``.jsonl.gz``, or a ``.zip`` holding one jsonl, as MMC4
    ships). Records are ``{"__key__": line number, "__url__", "line": bytes}``; blank lines are ignored."""

    extensions = ("jsonl", "jsonl.gz", "json.gz", "zip")

    def _open(self, path: str):
        if path.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.endswith(".zip"):
            archive = zipfile.ZipFile(path)
            names = [n for n in archive.namelist() if n.endswith((".jsonl", ".json"))]
            if not names:
                raise ShardError(f"{path}: no .jsonl inside")
            return io.BufferedReader(archive.open(names[0]))
        return open(path, "rb")

    def records(self, url: str, skip: int = 0) -> Iterator[dict]:
        try:
            f = self._open(url)
        except (OSError, zipfile.BadZipFile) as e:
            raise ShardError(f"cannot open {url}: {e}") from e
        try:
            i = 0
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                if i >= skip:
                    yield {"__key__": str(line_no), "__url__": url, "line": line}
                i += 1
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ShardError(f"error reading {url}: {e}") from e
        finally:
            f.close()


class ParquetSource:
    """Parquet files read one row group at a time; records are ``{"__key__": row, "__url__", "row": dict}``
    with the requested columns (skipping whole row groups by their metadata when resuming)."""

    extensions = ("parquet",)

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)

    def records(self, url: str, skip: int = 0) -> Iterator[dict]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(url)
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"cannot open {url}: {e}") from e
        missing = [c for c in self.columns if c not in pf.schema_arrow.names]
        if missing:
            raise ShardError(f"{url} has no column(s) {missing} (columns: {pf.schema_arrow.names})")
        row = 0
        try:
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if skip >= n:
                    skip -= n
                    row += n
                    continue
                table = pf.read_row_group(group, columns=self.columns).slice(skip)
                row += skip
                skip = 0
                for values in table.to_pylist():
                    yield {"__key__": str(row), "__url__": url, "row": values}
                    row += 1
        except (OSError, pa.ArrowException) as e:
            raise ShardError(f"error reading {url}: {e}") from e
