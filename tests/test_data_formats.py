"""Each data format is read, filtered, laid out and masked as specified: exact token and label tensors."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from flamingo_vlm.data import (
    IGNORE_INDEX, ImageFilter, InterleavedBuilder, MMC4Format, ObelicsFormat, PairsFormat, SkipSample, TokenLayout,
    VideoFormat, collate, decode_video, make_labels,
)
from flamingo_vlm.data.interleaved import DocImage
from train_fixtures import single_thread, colour_image, image_bytes, mp4_bytes, write_tar  # noqa: F401 (single_thread: a fixture)

MEDIA, EOC, EOS, PAD = 259, 260, 1, 261  # ids of the tiny tokenizer after add_special_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def layout(processor):
    lay = TokenLayout.from_processor(processor)
    assert (lay.media_token_id, lay.end_of_chunk_token_id, lay.eos_token_id, lay.pad_token_id) == (MEDIA, EOC, EOS, PAD)
    return lay


def read_all(fmt, shards):
    """Every usable sample of ``shards`` in file order, and the skip/drop counts (as a lane counts them)."""
    samples, counts = [], {}

    def add(reason, n=1):
        counts[reason] = counts.get(reason, 0) + n

    for shard in shards:
        for record in fmt.source.records(shard):
            try:
                sample = fmt.decode(record, np.random.default_rng(0))
            except SkipSample as e:
                add(e.reason)
                add("skipped_records")
                for reason, n in e.dropped.items():
                    add(reason, n)
            else:
                samples.append(sample)
                for reason, n in sample.dropped.items():
                    add(reason, n)
    return samples, counts


def enc(layout, text):
    return layout.encode(text)


def pixels(processor, image):
    return processor.image_transform(image)


# ---- labels ------------------------------------------------------------------------------------------
def test_make_labels_masks_padding_media_and_text_before_the_first_image():
    ids = torch.tensor([
        [5, 6, EOC, MEDIA, 7, EOC, EOS, PAD, PAD],   # interleaved: title, then an image
        [MEDIA, 8, 9, EOC, MEDIA, 10, EOC, EOS, PAD],
        [5, 6, 7, 8, EOS, PAD, PAD, PAD, PAD],       # text only: nothing is a target
    ])
    mask = (ids != PAD).long()
    mask[1, 7] = 1  # EOS stays a target even when a tokenizer pads with it (mask decides, not the id)
    labels = make_labels(ids, mask, MEDIA)
    X = IGNORE_INDEX
    assert labels.tolist() == [
        [X, X, X, X, 7, EOC, EOS, X, X],
        [X, 8, 9, EOC, X, 10, EOC, EOS, X],
        [X, X, X, X, X, X, X, X, X],
    ]


def test_collate_pads_right_and_counts_targets(layout, processor):
    a = torch.tensor([MEDIA, 10, 11, EOC, EOS])
    b = torch.tensor([12, EOC, MEDIA, 13, EOC, EOS, 14])
    img = pixels(processor, colour_image(0))[None]
    from flamingo_vlm.data import Sample

    batch = collate([Sample(a, [img], "a"), Sample(b, [img, img], "b")], pad_token_id=PAD, media_token_id=MEDIA)
    X = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[MEDIA, 10, 11, EOC, EOS, PAD, PAD], b.tolist()]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert batch["labels"].tolist() == [[X, 10, 11, EOC, EOS, X, X], [X, X, X, 13, EOC, EOS, 14]]
    assert batch["pixel_values"].shape == (3, 1, 3, 32, 32) and batch["frame_mask"] is None
    assert batch["num_targets"] == 4 + 4 and batch["num_tokens"] == 12 and batch["keys"] == ["a", "b"]


# ---- pairs ---------------------------------------------------------------------------------------------
def test_pairs_layout_labels_filters_and_skip_counts(tmp_path, layout, processor):
    red, blue, green = colour_image(0), colour_image(2), colour_image(1)
    shard = write_tar(tmp_path / "pairs-0.tar", [
        {"__key__": "k0", "png": image_bytes(red), "txt": "a red circle"},
        {"__key__": "k1", "jpg": image_bytes(blue, "JPEG"), "json": json.dumps({"caption": "a blue square", "url": "x"})},
        {"__key__": "k2", "webp": image_bytes(green, "WEBP"), "txt": "a green <image>star"},  # literal special token removed
        {"__key__": "k3", "png": b"not an image at all", "txt": "broken"},
        {"__key__": "k4", "png": image_bytes(red)},
        {"__key__": "k5", "txt": "caption without image"},
        {"__key__": "k6", "png": image_bytes(green), "txt": "the dog runs", "json": json.dumps({"similarity": 0.3})},
    ])
    fmt = PairsFormat(layout, processor.image_transform, max_tokens=32)
    samples, counts = read_all(fmt, [shard])
    assert [s.key.rsplit("#", 1)[1] for s in samples] == ["k0", "k1", "k2", "k6"]
    assert counts == {"corrupt_image": 1, "bad_record": 2, "skipped_records": 3}
    s = samples[0]
    expected = [MEDIA] + enc(layout, "a red circle") + [EOC, EOS]
    assert s.input_ids.tolist() == expected
    assert s.input_ids.tolist() == [MEDIA, 67, 223, 84, 71, 70, 223, 69, 75, 84, 69, 78, 71, EOC, EOS]
    assert samples[2].input_ids.tolist() == [MEDIA] + enc(layout, "a green star") + [EOC, EOS]
    assert samples[1].input_ids.tolist() == [MEDIA] + enc(layout, "a blue square") + [EOC, EOS]
    assert torch.equal(s.media[0], pixels(processor, red)[None])
    batch = collate(samples[:2], pad_token_id=PAD, media_token_id=MEDIA)
    pad = len(samples[1].input_ids) - len(expected)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] + expected[1:] + [IGNORE_INDEX] * pad

    short = PairsFormat(layout, processor.image_transform, max_tokens=5)
    assert read_all(short, [shard])[0][0].input_ids.tolist() == expected[:5]


def test_bos_of_the_tokenizer_comes_first(processor):
    from tokenizers.processors import TemplateProcessing

    from flamingo_vlm.tiny import make_tokenizer
    from flamingo_vlm import add_special_tokens

    tok = make_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    add_special_tokens(tok)
    lay = TokenLayout(tok, "<image>", "<|endofchunk|>")
    assert lay.prefix_ids == [0]
    assert lay.pair("a red circle", 64).tolist() == [0, MEDIA] + lay.encode("a red circle") + [EOC, EOS]


# ---- MMC4 ----------------------------------------------------------------------------------------------
def b64(img, fmt="PNG"):
    return base64.b64encode(image_bytes(img, fmt)).decode()


def info(index, img, sim=0.3, name="x.png"):
    return {"image_name": name, "matched_text_index": index, "matched_sim": sim, "image_base64": b64(img) if img is not None else None}


def noisy_png_truncated():
    arr = (np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")
    data = image_bytes(Image.fromarray(arr))
    return base64.b64encode(data[: len(data) // 2]).decode()


def mmc4(layout, processor, **kw):
    args = dict(max_tokens=256, max_images=5, p_next=0.0, image_filter=ImageFilter(64, 3.0), image_dir=None, min_similarity=0.24)
    args.update(kw)
    return MMC4Format(layout, processor.image_transform, **args)


def test_mmc4_webdataset_documents_filtered_laid_out_and_masked(tmp_path, layout, processor):
    red, green, blue, white = (colour_image(i) for i in (0, 1, 2, 3))
    doc_a = {
        "text_list": ["My pets", "My puppy sitting.", "It is small.", "My cat."],
        "image_info": [
            info(1, red, 0.30),
            info(1, blue, 0.35),                       # same sentence, more similar: replaces red
            info(2, green, 0.10),                      # below min_similarity
            info(3, colour_image(4, (32, 32)), 0.5),   # smaller than 64 px
            info(9, white, 0.5),                       # matched_text_index out of range
        ],
    }
    doc_b = {"text_list": ["Only one image", "text"], "image_info": [{**info(1, None), "image_base64": "!!!notbase64"}]}
    doc_c = {"text_list": ["Banner", "wide", "square one"], "image_info": [info(1, colour_image(5, (256, 64))), info(2, white)]}
    trunc = {"text_list": ["T", "first", "second"], "image_info": [info(1, red), {**info(2, None), "image_base64": noisy_png_truncated()}]}
    shard = write_tar(tmp_path / "docs-0.tar", [
        {"__key__": "a", "json": json.dumps(doc_a)},
        {"__key__": "b", "json": json.dumps(doc_b)},
        {"__key__": "c", "json": json.dumps(doc_c)},
        {"__key__": "d", "json": b"{not json"},
        {"__key__": "e", "json": json.dumps(trunc)},
        {"__key__": "f", "txt": b"no json member"},
    ])
    samples, counts = read_all(mmc4(layout, processor), [shard])
    assert [s.key.rsplit("#", 1)[1] for s in samples] == ["a", "c", "e"]
    # a: red and blue for sentence 1 -> blue kept; green, small and out-of-range dropped
    text_a = "My pets<|endofchunk|><image>My puppy sitting. It is small. My cat.<|endofchunk|>"
    ids_a = enc(layout, text_a) + [EOS]
    assert samples[0].input_ids.tolist() == ids_a
    assert ids_a.count(MEDIA) == 1 and ids_a[: len(enc(layout, "My pets")) + 2] == enc(layout, "My pets") + [EOC, MEDIA]
    assert len(samples[0].media) == 1 and torch.equal(samples[0].media[0], pixels(processor, blue)[None])
    labels = collate(samples[:1], pad_token_id=PAD, media_token_id=MEDIA)["labels"][0].tolist()
    first = ids_a.index(MEDIA)
    assert labels == [IGNORE_INDEX] * (first + 1) + ids_a[first + 1 :]
    assert labels[-2:] == [EOC, EOS]
    # c: the 4:1 banner is dropped, the square image kept before its sentence
    assert samples[1].input_ids.tolist() == enc(layout, "Banner wide<|endofchunk|><image>square one<|endofchunk|>") + [EOS]
    assert torch.equal(samples[1].media[0], pixels(processor, white)[None])
    # e: the truncated second image fails to decode -> dropped, the document laid out again without it
    assert samples[2].input_ids.tolist() == enc(layout, "T<|endofchunk|><image>first second<|endofchunk|>") + [EOS]
    assert counts == {
        "filtered_image": 3 + 1, "bad_record": 1 + 2, "corrupt_image": 1 + 1, "no_images": 1, "skipped_records": 3,
    }


def test_mmc4_keeps_the_first_max_images_and_cuts_before_the_next(layout, processor):
    texts = ["title"] + [f"sentence {k}" for k in range(7)]
    doc = {"text_list": texts, "image_info": [info(k + 1, colour_image(k)) for k in range(7)]}
    fmt = mmc4(layout, processor, max_images=5)
    sample = fmt.decode({"__key__": "k", "__url__": "u", "json": json.dumps(doc)}, np.random.default_rng(0))
    full_text = "title<|endofchunk|>" + "".join(f"<image>sentence {k}<|endofchunk|>" for k in range(7))
    full = enc(layout, full_text) + [EOS]
    sixth = [i for i, t in enumerate(full) if t == MEDIA][5]
    assert sample.input_ids.tolist() == full[:sixth]
    assert len(sample.media) == 5
    for k in range(5):
        assert torch.equal(sample.media[k], pixels(processor, colour_image(k))[None])


def test_random_window_holds_an_image_and_is_a_slice_of_the_document(layout, processor):
    texts = ["a long title " * 6] + [f"words about picture number {k} " * 3 for k in range(6)]
    doc = {"text_list": texts, "image_info": [info(k + 1, colour_image(k)) for k in range(6)]}
    record = {"__key__": "k", "__url__": "u", "json": json.dumps(doc)}
    fmt = mmc4(layout, processor, max_tokens=48, max_images=2)
    full_text = "".join(("<image>" if k else "") + t.strip() + "<|endofchunk|>" for k, t in enumerate(texts))
    full = enc(layout, full_text) + [EOS]
    starts = set()
    for seed in range(12):
        s = fmt.decode(record, np.random.default_rng(seed))
        ids = s.input_ids.tolist()
        assert len(ids) <= 48 and 1 <= ids.count(MEDIA) <= 2
        assert ids[-1] != MEDIA and ids.count(MEDIA) == len(s.media)
        start = next(i for i in range(len(full)) if full[i : i + len(ids)] == ids)  # a contiguous slice
        starts.add(start)
        # the images are those of the slice, in order
        before = full[:start].count(MEDIA)
        for j, m in enumerate(s.media):
            assert torch.equal(m, pixels(processor, colour_image(before + j))[None])
        # same seed, same window: deterministic
        assert fmt.decode(record, np.random.default_rng(seed)).input_ids.tolist() == ids
    assert len(starts) > 3  # the window really moves


def test_p_next_attaches_text_to_the_next_image(layout, processor):
    b = InterleavedBuilder(layout, processor.image_transform, max_tokens=256, p_next=1.0)
    i1, i2 = DocImage(colour_image(0)), DocImage(colour_image(1))
    sample = b.build(["T zero", i1, "T one", i2, "T two"], np.random.default_rng(0))
    assert sample.input_ids.tolist() == enc(layout, "<image>T zero<|endofchunk|><image>T one<|endofchunk|>") + [EOS]
    assert torch.equal(sample.media[0], pixels(processor, colour_image(0))[None])
    assert torch.equal(sample.media[1], pixels(processor, colour_image(1))[None])
    b0 = InterleavedBuilder(layout, processor.image_transform, max_tokens=256, p_next=0.0)
    prev = b0.build(["T zero", i1, "T one", i2, "T two"], np.random.default_rng(0))
    assert prev.input_ids.tolist() == enc(layout, "T zero<|endofchunk|><image>T one<|endofchunk|><image>T two<|endofchunk|>") + [EOS]


def test_mmc4_jsonl_with_an_image_directory(tmp_path, layout, processor):
    images = tmp_path / "images"
    images.mkdir()
    colour_image(0).save(images / "red.png")
    colour_image(2).save(images / "blue.png")
    docs = [
        {"text_list": ["Intro", "red thing"], "image_info": [{"image_name": "red.png", "matched_text_index": 1, "matched_sim": 0.3}]},
        {"text_list": ["a", "b", "c"], "image_info": [{"image_name": "gone.png", "matched_text_index": 1, "matched_sim": 0.3},
                                                      {"image_name": "blue.png", "matched_text_index": 2, "matched_sim": 0.3}]},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps(docs[0]) + "\n\n" + json.dumps(docs[1]) + "\n")
    fmt = mmc4(layout, processor, jsonl=True, image_dir=str(images))
    samples, counts = read_all(fmt, [str(path)])
    assert [s.input_ids.tolist() for s in samples] == [
        enc(layout, "Intro<|endofchunk|><image>red thing<|endofchunk|>") + [EOS],
        enc(layout, "a b<|endofchunk|><image>c<|endofchunk|>") + [EOS],
    ]
    assert torch.equal(samples[1].media[0], pixels(processor, colour_image(2))[None])
    assert counts == {"missing_file": 1}


# ---- OBELICS -------------------------------------------------------------------------------------------
def test_obelics_parquet_embedded_bytes_and_image_directory(tmp_path, layout, processor):
    red, blue = colour_image(0), colour_image(2)
    embedded = pa.table({
        "images": [[None, {"bytes": image_bytes(red), "path": "r.png"}, None], [None, None]],
        "texts": [["Intro text", None, "about red"], ["x", None]],  # the second row is malformed
        "general_metadata": ["{}", "{}"],
    })
    pq.write_table(embedded, tmp_path / "emb.parquet", row_group_size=1)
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    blue.save(img_dir / "blue.png")
    (img_dir / "00000").mkdir()  # the URL's image as img2dataset fetches it: named by key, the URL in the .json
    red.save(img_dir / "00000" / "000000000.png")
    (img_dir / "00000" / "000000000.json").write_text(json.dumps({"url": "https://example.com/a/pic.png?x=1", "key": "000000000", "status": "success"}))
    by_path = pa.table({
        "images": [["blue.png", None, "https://example.com/a/pic.png?x=1", None, "missing.png", None]],
        "texts": [[None, "about blue", None, "about the pic", None, "end"]],
    })
    pq.write_table(by_path, tmp_path / "paths.parquet")
    fmt = ObelicsFormat(layout, processor.image_transform, max_tokens=256, max_images=5, p_next=0.0,
                        image_filter=ImageFilter(64, 3.0), image_dir=str(img_dir))
    samples, counts = read_all(fmt, [str(tmp_path / "emb.parquet"), str(tmp_path / "paths.parquet")])
    assert [s.input_ids.tolist() for s in samples] == [
        enc(layout, "Intro text<|endofchunk|><image>about red<|endofchunk|>") + [EOS],
        enc(layout, "<image>about blue<|endofchunk|><image>about the pic end<|endofchunk|>") + [EOS],
    ]
    assert [len(s.media) for s in samples] == [1, 2]
    assert torch.equal(samples[0].media[0], pixels(processor, red)[None])
    assert torch.equal(samples[1].media[0], pixels(processor, blue)[None])
    assert torch.equal(samples[1].media[1], pixels(processor, red)[None])
    assert counts == {"bad_record": 1, "skipped_records": 1, "missing_file": 1}


# ---- video ---------------------------------------------------------------------------------------------
def nearest_colour(frame: Image.Image) -> int:
    mean = np.asarray(frame.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
    from train_fixtures import COLOURS

    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in COLOURS]))


def test_decode_video_samples_frames_at_the_set_rate():
    clip = mp4_bytes([colour_image(k) for k in range(8)], fps=4)  # 2 s, one colour per frame
    assert [nearest_colour(f) for f in decode_video(clip, 8)] == list(range(8))
    assert [nearest_colour(f) for f in decode_video(clip, 4)] == [1, 3, 5, 7]  # centres of 4 segments of the clip
    assert [nearest_colour(f) for f in decode_video(clip, 8, fps=2)] == [0, 2, 4, 6]  # 2 FPS: 4 frames in 2 s
    assert [nearest_colour(f) for f in decode_video(clip, 3, fps=2)] == [0, 2, 4]  # at most num_frames
    assert [nearest_colour(f) for f in decode_video(clip, 8, fps=1)] == [0, 4]  # the paper's 1 FPS
    webm = mp4_bytes([colour_image(k) for k in range(4)], fps=4, codec="libvpx", container="webm")
    assert [nearest_colour(f) for f in decode_video(webm, 4)] == [0, 1, 2, 3]


def test_rgb_images_give_the_pixels_of_pyav_to_image():
    import io

    import av

    from flamingo_vlm.processing.video import rgb_images

    clip = mp4_bytes([colour_image(k) for k in range(6)], fps=4)
    with av.open(io.BytesIO(clip)) as container:
        frames = list(container.decode(container.streams.video[0]))
    assert frames[0].format.name == "yuv420p"  # a conversion to do, not a copy
    ours = rgb_images(frames)
    assert [im.mode for im in ours] == ["RGB"] * 6
    assert all(np.array_equal(np.asarray(a), np.asarray(f.to_image())) for a, f in zip(ours, frames))


def test_video_shards_give_one_medium_of_frames_and_skip_broken_clips(tmp_path, layout, processor):
    frames = [colour_image(k) for k in range(8)]
    shard = write_tar(tmp_path / "videos-0.tar", [
        {"__key__": "v0", "mp4": mp4_bytes(frames), "txt": "a dot moves right"},
        {"__key__": "v1", "mp4": b"\x00\x00\x00\x18ftypmp42 broken", "txt": "broken"},
        {"__key__": "v2", "mp4": mp4_bytes(frames[:3]), "txt": "short clip"},
    ])
    fmt = VideoFormat(layout, processor.image_transform, max_tokens=32, num_frames=4)
    samples, counts = read_all(fmt, [shard])
    assert counts == {"bad_video": 1, "skipped_records": 1}
    v0, v2 = samples
    assert v0.input_ids.tolist() == [MEDIA] + enc(layout, "a dot moves right") + [EOC, EOS]
    assert v0.media[0].shape == (4, 3, 32, 32) and v2.media[0].shape[0] == 3
    batch = collate(samples, pad_token_id=PAD, media_token_id=MEDIA)
    assert batch["pixel_values"].shape == (2, 4, 3, 32, 32)
    assert batch["frame_mask"].tolist() == [[True] * 4, [True, True, True, False]]
