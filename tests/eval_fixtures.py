"""Tiny benchmark files in the official formats, written by the tests (helper for tests/test_eval_*.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and when the cores are busy (another process),
    OpenMP's spinning threads make them many times slower: run these tests on one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


COLOURS = [(220, 20, 30), (10, 200, 40), (20, 30, 210), (250, 250, 250), (240, 220, 10), (120, 20, 160), (0, 0, 0), (250, 130, 0)]


def solid(i: int, size=(40, 36)) -> Image.Image:
    c = COLOURS[i % len(COLOURS)]
    img = Image.new("RGB", size, c)
    img.putpixel((3, 5), (c[2], c[0], c[1]))
    return img


def write_video(path: Path, colours: list[int], size: int = 32, fps: int = 4) -> None:
    """An MPEG-4 video whose frame k is the solid colour COLOURS[colours[k]]."""
    import av
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for c in colours:
            frame = np.full((size, size, 3), COLOURS[c % len(COLOURS)], dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def write_karpathy(root: Path, name: str = "dataset_coco.json", with_filepath: bool = True) -> Path:
    """COCO/Flickr Karpathy json: 3 test images, 5 train, 1 restval."""
    images = []
    for i in range(9):
        split = "test" if i < 3 else ("restval" if i == 8 else "train")
        sub = ("val2014" if split == "test" else "train2014") if with_filepath else ""
        filename = f"COCO_{sub or 'img'}_{i:012d}.jpg"
        (root / sub).mkdir(parents=True, exist_ok=True)
        solid(i).save(root / sub / filename)
        sentences = [{"raw": f"A photo of colour {i}.", "tokens": []}, {"raw": f"Colour number {i} fills the picture.", "tokens": []}]
        entry = {"filename": filename, "split": split, "sentences": sentences, "imgid": i, "cocoid": 1000 + i}
        if with_filepath:
            entry["filepath"] = sub
        images.append(entry)
    path = root / name
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


def write_vqa(root: Path, prefix: str = "v2_") -> dict[str, Path]:
    """VQAv2-format questions + annotations for train2014 (5) and val2014 (3), COCO image names."""
    out = {}
    root.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train2014", 5, 0), ("val2014", 3, 500)):
        questions, annotations = [], []
        for i in range(count):
            image_id = offset + i
            solid(i).save(root / f"COCO_{split}_{image_id:012d}.jpg")
            qid = image_id * 10 + 1
            answers = ["red"] * 6 + ["Red."] * 2 + ["two"] * 2 if i % 2 else ["2"] * 10
            questions.append({"image_id": image_id, "question": f"what is in picture {i}?", "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": image_id, "answer_type": "other", "question_type": "what",
                "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)],
            })
        q = root / f"{prefix}OpenEnded_mscoco_{split}_questions.json"
        a = root / f"{prefix}mscoco_{split}_annotations.json"
        q.write_text(json.dumps({"data_subtype": split, "questions": questions}))
        a.write_text(json.dumps({"data_subtype": split, "annotations": annotations}))
        out[split] = (q, a)
    return {"image_dir": root, "train_q": out["train2014"][0], "train_a": out["train2014"][1],
            "val_q": out["val2014"][0], "val_a": out["val2014"][1]}


def write_vizwiz(root: Path) -> dict[str, Path]:
    """VizWiz's own json: a list of {"image", "question", "answers": [{"answer", "answer_confidence"}]}."""
    out = {}
    for split, count in (("train", 5), ("val", 3)):
        rows = []
        for i in range(count):
            name = f"VizWiz_{split}_{i:08d}.jpg"
            (root / split).mkdir(parents=True, exist_ok=True)
            solid(i).save(root / split / name)
            answers = ["unanswerable"] * 10 if i == 0 else ["blue"] * 10
            rows.append({"image": name, "question": f"what colour is it {i}?", "answerable": int(i != 0),
                         "answer_type": "other", "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
        (root / f"{split}.json").write_text(json.dumps(rows))
        out[split] = root / f"{split}.json"
    return out


def write_textvqa(root: Path) -> dict[str, Path]:
    """TextVQA's own json: {"data": [{"question_id", "image_id", "question", "answers": [10 strings]}]}."""
    out = {}
    root.mkdir(parents=True, exist_ok=True)
    for split, count, offset in (("train", 5, 0), ("val", 3, 100)):
        rows = []
        for i in range(count):
            image_id = f"{offset + i:016x}"
            solid(i).save(root / f"{image_id}.jpg")
            rows.append({"question_id": offset + i, "image_id": image_id, "question": "what does the sign say?",
                         "answers": ["stop"] * 7 + ["stop sign"] * 3, "image_classes": ["sign"]})
        (root / f"TextVQA_0.5.1_{split}.json").write_text(json.dumps({"dataset_name": "textvqa", "data": rows}))
        out[split] = root / f"TextVQA_0.5.1_{split}.json"
    return out


def write_hateful_memes(root: Path) -> dict[str, Path]:
    """HatefulMemes jsonl ({"id", "img": "img/ID.png", "label", "text"}): train 6, dev 4 (both labels)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    out = {}
    for split, ids in (("train", range(10000, 10006)), ("dev", range(20000, 20004))):
        lines = []
        for k, mid in enumerate(ids):
            solid(k).save(root / "img" / f"{mid}.png")
            lines.append(json.dumps({"id": mid, "img": f"img/{mid}.png", "label": k % 2, "text": f"meme text {k}"}))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        out[split] = root / f"{split}.jsonl"
    return out


CLASSES = ["red thing", "green thing", "blue thing"]


def write_classification(root: Path) -> dict[str, Path]:
    """ImageNet-style: list files ("relative/path label") + classnames.txt, and class folders (wnid dirs)."""
    out = {}
    for split, count in (("train", 6), ("val", 3)):
        lines = []
        for i in range(count):
            rel = f"{split}/{split}_{i:04d}.jpg"
            (root / split).mkdir(parents=True, exist_ok=True)
            solid(i % 3).save(root / rel)
            lines.append(f"{rel} {i % 3}")
            wnid = f"n0000000{i % 3}"
            (root / "folders" / split / wnid).mkdir(parents=True, exist_ok=True)
            solid(i % 3).save(root / "folders" / split / wnid / f"{i:04d}.JPEG")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        out[split] = root / f"{split}.txt"
        out[f"{split}_folder"] = root / "folders" / split
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    out["classnames"] = root / "classnames.txt"
    return out


def write_video_qa(root: Path) -> dict[str, Path]:
    """MSVD-QA style json ([{"video_id", "question", "answer", "id"}]) with videos named vid{video_id}.mp4."""
    out = {}
    for split, count, offset in (("train", 5, 0), ("test", 3, 50)):
        rows = []
        for i in range(count):
            vid = offset + i
            write_video(root / "videos" / f"vid{vid}.mp4", [i, i + 1, i + 2, i + 3, i + 4, i + 5])
            rows.append({"video_id": vid, "question": "what colour comes first?", "answer": f"colour{i}", "id": 7000 + vid})
        (root / f"{split}_qa.json").write_text(json.dumps(rows))
        out[split] = root / f"{split}_qa.json"
    out["video_dir"] = root / "videos"
    return out


def write_vatex(root: Path) -> dict[str, Path]:
    """VATEX json ([{"videoID", "enCap": [...], "chCap": [...]}]) with videos {videoID}.mp4."""
    out = {}
    for split, count in (("train", 5), ("val", 3)):
        rows = []
        for i in range(count):
            vid = f"{split}Vid-{i:03d}_000010_000020"
            write_video(root / "videos" / f"{vid}.mp4", [i, i, i + 1, i + 1])
            rows.append({"videoID": vid, "enCap": [f"A clip of colour {i}.", f"Colour {i} then colour {i + 1}."], "chCap": ["..."]})
        (root / f"vatex_{split}.json").write_text(json.dumps(rows))
        out[split] = root / f"vatex_{split}.json"
    out["video_dir"] = root / "videos"
    return out


def write_all(root: Path) -> dict[str, dict]:
    """Every benchmark's fixture under ``root``; returns the task configs (for build_task) by type."""
    root = Path(root)
    coco = write_karpathy(root / "coco")
    flickr = write_karpathy(root / "flickr30k", "dataset_flickr30k.json", with_filepath=False)
    vqa = write_vqa(root / "vqav2")
    okvqa = write_vqa(root / "okvqa", prefix="")
    viz = write_vizwiz(root / "vizwiz")
    tvqa = write_textvqa(root / "textvqa")
    hm = write_hateful_memes(root / "hateful_memes")
    cls = write_classification(root / "imagenet")
    vqa_video = write_video_qa(root / "msvd")
    vatex = write_vatex(root / "vatex")
    return {
        "coco_captioning": {"type": "coco_captioning", "karpathy_json": str(coco), "image_dir": str(root / "coco")},
        "flickr30k_captioning": {"type": "flickr30k_captioning", "karpathy_json": str(flickr), "image_dir": str(root / "flickr30k"),
                                 "support_split": ["train", "restval"]},
        "vqav2": {"type": "vqav2", "questions_json": str(vqa["val_q"]), "annotations_json": str(vqa["val_a"]), "image_dir": str(vqa["image_dir"]),
                  "support_questions_json": str(vqa["train_q"]), "support_annotations_json": str(vqa["train_a"])},
        "ok_vqa": {"type": "ok_vqa", "questions_json": str(okvqa["val_q"]), "annotations_json": str(okvqa["val_a"]), "image_dir": str(okvqa["image_dir"]),
                   "support_questions_json": str(okvqa["train_q"]), "support_annotations_json": str(okvqa["train_a"])},
        "vizwiz": {"type": "vizwiz", "questions_json": str(viz["val"]), "image_dir": str(root / "vizwiz" / "val"),
                   "support_questions_json": str(viz["train"]), "support_image_dir": str(root / "vizwiz" / "train")},
        "textvqa": {"type": "textvqa", "questions_json": str(tvqa["val"]), "image_dir": str(root / "textvqa"),
                    "support_questions_json": str(tvqa["train"])},
        "hateful_memes": {"type": "hateful_memes", "jsonl": str(hm["dev"]), "image_dir": str(root / "hateful_memes"),
                          "support_jsonl": str(hm["train"])},
        "imagenet": {"type": "imagenet", "list_file": str(cls["val"]), "support_list_file": str(cls["train"]),
                     "class_names": str(cls["classnames"])},
        "msvd_qa": {"type": "msvd_qa", "qa_json": str(vqa_video["test"]), "support_qa_json": str(vqa_video["train"]),
                    "video_dir": str(vqa_video["video_dir"]), "video_name_format": "vid{video_id}.mp4", "num_frames": 3},
        "vatex": {"type": "vatex", "annotations_json": str(vatex["val"]), "support_annotations_json": str(vatex["train"]),
                  "video_dir": str(vatex["video_dir"]), "num_frames": 3},
    }
