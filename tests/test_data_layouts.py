"""Interleaved data read in the layouts it is published and downloaded in: every document keeps exactly
its own images.

- MMC4's original release: ``docs_no_face_shard_{i}_v3.jsonl.zip`` with each shard's images in
  ``docs_no_face_shard_{i}_v3_images/`` (allenai/mmc4 ``scripts/download_images.py``);
- OBELICS: a snapshot's ``data/*.parquet`` beside its opt-out versions, images named by URL and fetched
  with img2dataset (``output_format: files``: ``{shard}/{key}.jpg`` + ``{key}.json``, ``{shard}.parquet``).
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flamingo_vlm.data import SkipSample, TokenLayout
from flamingo_vlm.data.image_files import UrlIndex, shard_image_dirs
from flamingo_vlm.data.mixture import dataset_shards, make_format
from flamingo_vlm.training import DatasetConfig
from train_fixtures import COLOURS, colour_image, single_thread  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def read_all(cfg: DatasetConfig, processor, data_root=None):
    """{document text: [colour index of each image]} of every usable document, and the skip/drop counts."""
    layout = TokenLayout.from_processor(processor)
    shards = dataset_shards(cfg, data_root)
    fmt = make_format(cfg, layout, processor.image_transform, shards, data_root)
    refs = torch.stack([processor.image_transform(colour_image(i)) for i in range(len(COLOURS))])
    docs, counts = {}, {}

    def add(reason, n=1):
        counts[reason] = counts.get(reason, 0) + n

    for shard in shards:
        for record in fmt.source.records(shard):
            try:
                sample = fmt.decode(record, np.random.default_rng(0))
            except SkipSample as e:
                add(e.reason)
                for reason, n in e.dropped.items():
                    add(reason, n)
                continue
            text = processor.tokenizer.decode(sample.input_ids.tolist())
            colours = [int(((refs - m).flatten(1) ** 2).sum(1).argmin()) for m in torch.cat(sample.media)]
            docs[re.match(r"(?:<image>)?(\w+)", text).group(1)] = colours  # the document's title
            for reason, n in sample.dropped.items():
                add(reason, n)
    return docs, counts


def save_jpeg(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=95)


# ---- MMC4 ------------------------------------------------------------------------------------------------
def write_mmc4_shard(root: Path, shard: int, docs: list[dict]) -> Path:
    """docs_no_face_shard_{shard}_v3.jsonl.zip holding docs_no_face_shard_{shard}_v3.jsonl, as MMC4 ships."""
    name = f"docs_no_face_shard_{shard}_v3.jsonl"
    path = root / f"{name}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name, "".join(json.dumps(d) + "\n" for d in docs))
    return path


def mmc4_doc(title: str, images: list[tuple[str, int, float]]) -> dict:
    """A document: a title, then one sentence per (image name, matched sentence, similarity)."""
    sentences = sorted({index for _, index, _ in images})
    texts = [title] + [f"{title} sentence {k}" for k in range(1, max(sentences) + 1)]
    infos = [
        {
            "image_name": n,
            "raw_url": f"http://example.com/{n}",
            "matched_text_index": i,
            "matched_sim": s,
            "face_detections": None,
        }
        for n, i, s in images
    ]
    return {"url": f"http://example.com/{title}", "text_list": texts, "image_info": infos, "similarity_matrix": []}


@pytest.mark.parametrize("where", ["image_dir", "beside_shards"])
def test_mmc4_per_shard_image_folders(tmp_path, processor, where):
    # both shards name an image "0a1b.jpg": each document must get its own shard's file
    shards = tmp_path / "mmc4"
    images = tmp_path / "mmc4_images" if where == "image_dir" else shards
    docs = {
        0: [mmc4_doc("alpha", [("0a1b.jpg", 1, 0.3), ("77ff.jpg", 2, 0.3)])],
        1: [mmc4_doc("beta", [("0a1b.jpg", 1, 0.3)]), mmc4_doc("gamma", [("c3d4.jpg", 1, 0.3)])],
    }
    colours = {(0, "0a1b.jpg"): 0, (0, "77ff.jpg"): 1, (1, "0a1b.jpg"): 2, (1, "c3d4.jpg"): 3}
    for s, d in docs.items():
        write_mmc4_shard(shards, s, d)
    for (s, name), colour in colours.items():
        save_jpeg(colour_image(colour), images / f"docs_no_face_shard_{s}_v3_images" / name)
    cfg = DatasetConfig(
        name="mmc4",
        format="mmc4",
        paths=["mmc4/*.jsonl.zip"],
        batch_size=1,
        image_dir="mmc4_images" if where == "image_dir" else None,
    )
    found, counts = read_all(cfg, processor, data_root=str(tmp_path))
    assert found == {"alpha": [0, 1], "beta": [2], "gamma": [3]}
    assert counts == {}


def test_mmc4_image_folder_names(tmp_path):
    shard = tmp_path / "docs_no_face_shard_7_v3.jsonl.zip"
    for folder in ("docs_no_face_shard_7_v3_images", "docs_no_face_shard_7_v3.jsonl_images", "flat"):
        (tmp_path / folder).mkdir()
    assert shard_image_dirs(str(shard), str(tmp_path / "flat")) == [
        str(tmp_path / "docs_no_face_shard_7_v3_images"),
        str(tmp_path / "docs_no_face_shard_7_v3.jsonl_images"),
        str(tmp_path / "flat"),
    ]
    assert shard_image_dirs(str(tmp_path / "docs_no_face_shard_8_v3.jsonl"), None) == []


def test_mmc4_two_images_for_one_sentence_fall_back_when_the_best_is_missing(tmp_path, processor):
    doc = mmc4_doc("delta", [("best.jpg", 1, 0.40), ("second.jpg", 1, 0.30), ("third.jpg", 1, 0.28)])
    write_mmc4_shard(tmp_path, 0, [doc])
    folder = tmp_path / "docs_no_face_shard_0_v3_images"
    save_jpeg(colour_image(4), folder / "second.jpg")  # the most similar image's download failed
    save_jpeg(colour_image(5), folder / "third.jpg")
    found, counts = read_all(DatasetConfig(name="m", format="mmc4", paths=[str(tmp_path)], batch_size=1), processor)
    assert found == {"delta": [4]}
    assert counts == {"missing_file": 1, "filtered_image": 1}  # best missing; third not needed


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_decompression_bomb_drops_only_that_image(tmp_path, processor, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)  # PIL refuses images over 2x this: the 100 x 100 one
    doc = mmc4_doc("epsilon", [("ok.jpg", 1, 0.3), ("bomb.png", 2, 0.3)])
    write_mmc4_shard(tmp_path, 0, [doc])
    folder = tmp_path / "docs_no_face_shard_0_v3_images"
    save_jpeg(colour_image(6, (66, 64)), folder / "ok.jpg")
    colour_image(7, (100, 100)).save(folder / "bomb.png")
    found, counts = read_all(DatasetConfig(name="m", format="mmc4", paths=[str(tmp_path)], batch_size=1), processor)
    assert found == {"epsilon": [6]}
    assert counts == {"corrupt_image": 1}


# ---- OBELICS ---------------------------------------------------------------------------------------------
# (url, colour): two URLs share the last segment "image.jpg"; one download failed
URLS = [
    ("https://a.example/1/image.jpg", 0),
    ("https://b.example/2/image.jpg", 1),
    ("https://c.example/x.png?s=2", 2),
    ("https://d.example/gone.jpg", None),
]


def write_img2dataset(root: Path, urls, with_parquet: bool) -> None:
    """img2dataset output_format=files: shard 00000 holds {key}.jpg + {key}.json (+ {key}.txt), and
    00000.parquet lists every url with its key and status."""
    rows = {"url": [], "key": [], "status": [], "error_message": []}
    for i, (url, colour) in enumerate(urls):
        key = f"00000{i:04d}"
        ok = colour is not None
        if ok:
            save_jpeg(colour_image(colour), root / "00000" / f"{key}.jpg")
            (root / "00000" / f"{key}.txt").write_text("")
        (root / "00000").mkdir(parents=True, exist_ok=True)
        status = "success" if ok else "failed_to_download"
        (root / "00000" / f"{key}.json").write_text(
            json.dumps({"url": url, "key": key, "status": status, "caption": None})
        )
        for column, value in (("url", url), ("key", key), ("status", status), ("error_message", None)):
            rows[column].append(value)
    if with_parquet:
        pq.write_table(pa.table(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": len(urls)}))


def obelics_row(title: str, urls: list[str]) -> dict:
    images, texts = [None], [title]
    for k, url in enumerate(urls):
        images += [url, None]
        texts += [None, f"{title} text {k}"]
    return {"images": images, "texts": texts, "metadata": "[]", "general_metadata": "{}"}


@pytest.mark.parametrize("with_parquet", [True, False], ids=["parquet_index", "json_sidecars"])
def test_obelics_snapshot_with_img2dataset_images(tmp_path, processor, with_parquet):
    snapshot = tmp_path / "OBELICS"
    rows = [
        obelics_row("one", [URLS[0][0], URLS[2][0]]),
        obelics_row("two", [URLS[1][0]]),
        obelics_row("three", [URLS[3][0], URLS[0][0]]),
    ]
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2]), snapshot / "data" / "train-00000-of-00002-aa.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), snapshot / "data" / "train-00001-of-00002-bb.parquet")
    for optout in ("opt_out_docs_removed", "opt_out_docs_removed_2023_07_12"):  # the same set again, opt-outs removed
        (snapshot / optout).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), snapshot / optout / "train-00000-of-00001-cc.parquet")
    write_img2dataset(tmp_path / "obelics_images", URLS, with_parquet)
    cfg = DatasetConfig(name="obelics", format="obelics", paths=["OBELICS"], batch_size=1, image_dir="obelics_images")
    assert [Path(s).parent.name for s in dataset_shards(cfg, str(tmp_path))] == ["data", "data"]
    found, counts = read_all(cfg, processor, data_root=str(tmp_path))
    assert found == {"one": [0, 2], "two": [1], "three": [0]}
    assert counts == {"missing_file": 1}  # gone.jpg: img2dataset could not fetch it
    # an opt-out folder named on its own is read
    optout = DatasetConfig(name="o", format="obelics", paths=["OBELICS/opt_out_docs_removed_2023_07_12"], batch_size=1)
    assert len(dataset_shards(optout, str(tmp_path))) == 1


def test_url_index_is_by_whole_url(tmp_path):
    write_img2dataset(tmp_path, URLS, with_parquet=True)
    index = UrlIndex(str(tmp_path))
    assert len(index) == 3
    a, b = index.find(URLS[0][0]), index.find(URLS[1][0])
    assert a != b and a.endswith("000000000.jpg") and b.endswith("000000001.jpg")
    for url in ("https://elsewhere.example/image.jpg", URLS[3][0]):  # same basename, and a failed download
        with pytest.raises(SkipSample, match="missing_file"):
            index.find(url)
