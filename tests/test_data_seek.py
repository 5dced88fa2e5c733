"""Resume seeks: a local tar shard is indexed from its headers, records are read from their byte
offset exactly as webdataset reads them in sequence, and a resumed lane reads only what remains."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from flamingo_vlm.data import DatasetStream, LaneState, PairsFormat, StreamSpec, TarSource, TokenLayout
from flamingo_vlm.data import sources
from train_fixtures import image_bytes, single_thread, write_tar  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def noise_png(i: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)  # incompressible: ~7 KB
    return image_bytes(Image.fromarray(pixels))


@pytest.fixture(scope="module")
def odd_tar(tmp_path_factory):
    """A tar with what webdataset skips or groups specially: a directory, meta files, a file without an
    extension, keys in subfolders, multi-dot extensions, records of 1 to 3 members."""
    path = tmp_path_factory.mktemp("odd") / "odd.tar"
    entries = [("__info__.json", b"{}"), ("dir/", None), ("a/k0.png", noise_png(0)), ("a/k0.txt", b"zero"),
               ("README", b"no extension"), ("a/k1.seg.png", noise_png(1)), ("a/k1.txt", b"one"), ("a/__meta__/x.txt", b"m"),
               ("__meta__/y.txt", b"skipped"), ("__x__", b"skipped"), ("k2.txt", b"two"), ("k3.json", b"{}"), ("k3.txt", b"three"), ("k3.cls", b"3")]
    with tarfile.open(path, "w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def strip(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "__local_path__"}


def test_seeking_reads_each_record_as_webdataset_reads_it_in_sequence(odd_tar):
    expected = [strip(r) for r in wds.WebDataset(odd_tar, shardshuffle=False)]  # webdataset's own reading
    assert [r["__key__"] for r in expected] == ["__info__", "a/k0", "a/k1", "a/__meta__/x", "k2", "k3"]
    source = TarSource()
    assert [strip(r) for r in source.records(odd_tar)] == expected
    assert len(sources.tar_index(odd_tar)) == len(expected)
    for skip in range(len(expected) + 2):
        assert [strip(r) for r in source.records(odd_tar, skip=skip)] == expected[skip:]
    for wanted in ([0], [3], [1, 2], [0, 2, 3], [0, 1, 2, 3], [2, 7]):
        got = sources.read_records(source, odd_tar, wanted)
        assert {i: strip(r) for i, r in got.items()} == {i: expected[i] for i in wanted if i < len(expected)}


class Counting:
    """Wraps sources._open_local: the bytes read from every local shard opened."""

    def __init__(self) -> None:
        self.bytes = 0
        self.real = sources._open_local

    def __call__(self, path):
        outer, f = self, self.real(path)

        class File(io.RawIOBase):
            def readable(self):
                return True

            def seekable(self):
                return True

            def readinto(self, b):
                n = f.readinto(b)
                outer.bytes += n or 0
                return n

            def seek(self, *a):
                return f.seek(*a)

            def tell(self):
                return f.tell()

            def close(self):
                f.close()
                super().close()

        return File()


def test_a_resumed_lane_seeks_to_its_record_and_reads_only_the_rest(tmp_path, processor, monkeypatch):
    n, cut = 24, 17
    url = write_tar(tmp_path / "big.tar", [{"__key__": f"k{i:03d}", "png": noise_png(i, 96), "txt": f"caption {i}"} for i in range(n)])
    fmt = PairsFormat(TokenLayout.from_processor(processor), processor.image_transform)
    spec = StreamSpec("big", (url,), lanes=1, shuffle=False)

    def run(states, steps):
        stream = DatasetStream(spec, fmt, batch_size=1, states=states)
        out = [s.key for _ in range(steps) for s in stream.next_samples()]
        return out, {lane: LaneState.from_dict(s.to_dict()) for lane, s in stream.states.items()}

    straight, _ = run(None, n)
    _, saved = run(None, cut)
    assert (saved[0].shard, saved[0].record) == (0, cut)
    sources._INDEX_CACHE.clear()
    counter = Counting()
    monkeypatch.setattr(sources, "_open_local", counter)
    rest, _ = run(saved, n - cut)
    assert rest == straight[cut:]
    with tarfile.open(url) as tar:  # the bytes from record `cut`'s first header to the end, by tarfile itself
        members = tar.getmembers()
        start = next(m.offset for m in members if m.name.startswith(f"k{cut:03d}."))
    size = len(open(url, "rb").read())
    headers = size - sum(m.size for m in members) + len(members)  # the index reads the headers (and a byte before each)
    assert counter.bytes <= size - start + headers
    assert counter.bytes < 0.5 * size  # reading the shard up to the record would cost ~ the whole file


def test_a_resumed_shuffle_buffer_fetches_its_records_by_position(tmp_path, processor, monkeypatch):
    urls = [write_tar(tmp_path / f"s{s}.tar", [{"__key__": f"s{s}k{i:03d}", "png": noise_png(100 * s + i), "txt": "x"} for i in range(12)])
            for s in range(3)]
    fmt = PairsFormat(TokenLayout.from_processor(processor), processor.image_transform)
    spec = StreamSpec("mix", tuple(urls), lanes=1, shuffle_buffer=6)

    def run(states, steps):
        stream = DatasetStream(spec, fmt, batch_size=2, states=states)
        out = [s.key for _ in range(steps) for s in stream.next_samples()]
        return out, {lane: LaneState.from_dict(s.to_dict()) for lane, s in stream.states.items()}

    straight, _ = run(None, 18)  # one epoch
    _, saved = run(None, 10)
    sources._INDEX_CACHE.clear()
    counter = Counting()
    monkeypatch.setattr(sources, "_open_local", counter)
    rest, _ = run(saved, 8)
    assert rest == straight[20:]
    # what remains: the 16 records not drawn yet (5 in the buffer, 11 at or after the head), plus the headers
    tars = [tarfile.open(u) for u in urls]
    records = {m.name.split(".")[0]: 0 for t in tars for m in t.getmembers()}
    for t in tars:
        for m in t.getmembers():
            records[m.name.split(".")[0]] += m.size
    headers = sum(len(open(u, "rb").read()) - sum(m.size for m in t.getmembers()) for u, t in zip(urls, tars))
    streams = len(saved[0].buffer) + len(urls)  # at most one seek per buffered record and per shard of the head,
    overshoot = streams * 2 * 10240  # each reading ahead up to two of tarfile's 10 KiB stream blocks
    assert counter.bytes <= sum(records[k.rsplit("#", 1)[1]] for k in straight[20:]) + headers + overshoot
    assert counter.bytes < 0.75 * sum(len(open(u, "rb").read()) for u in urls)
