"""Where records come from: webdataset tar shards, jsonl files, parquet files.

A *source* turns one shard (a file or URL) into a stream of raw records (undecoded: bytes, json text,
parquet row dicts), and can start ``skip`` records in without decoding them, which is how a run resumes.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import io
import os
import zipfile
from typing import Iterator, Sequence

import webdataset as wds
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

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


class TarSource:
    """webdataset tar shards: files sharing a key (``000123.jpg``, ``000123.txt``) form one record
    ``{"__key__", "__url__", ext: bytes}`` (webdataset's own grouping), read as a stream."""

    extensions = ("tar",)

    def records(self, url: str, skip: int = 0) -> Iterator[dict]:
        try:
            stream = wds.gopen(url, "rb")
        except Exception as e:  # noqa: BLE001 - a missing or unreachable shard of any kind
            raise ShardError(f"cannot open {url}: {e}") from e
        try:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            for i, record in enumerate(group_by_keys(files)):
                if i >= skip:
                    yield record
        except Exception as e:  # noqa: BLE001 - tarfile.ReadError, truncated streams, bad headers
            raise ShardError(f"error reading {url}: {e}") from e
        finally:
            stream.close()


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
