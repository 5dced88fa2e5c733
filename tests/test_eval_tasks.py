"""Task readers on tiny files in the official formats, prompts, post-processing and the registry."""

from pathlib import Path

import pytest
from PIL import Image

from eval_fixtures import CLASSES, COLOURS, write_all, write_video
from eval_fixtures import one_torch_thread  # noqa: F401  (autouse: one torch thread for these tests)
from flamingo_vlm import Video
from flamingo_vlm.evaluation import (
    TASK_TYPES,
    Classification,
    Example,
    Prediction,
    Task,
    build_task,
    load_video,
    register_task,
)
from flamingo_vlm.evaluation.tasks.hateful_memes import positive_probability

EOC = "<|endofchunk|>"


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    return write_all(tmp_path_factory.mktemp("benchmarks"))


def _media_exist(examples):
    return all(Path(m).is_file() for ex in examples for m in ex.media)


def test_coco_karpathy(specs):
    task = build_task(specs["coco_captioning"])
    assert task.name == "coco" and task.kind == "generate" and task.metric == "cider"
    q, s = task.queries(), task.support()
    assert [ex.id for ex in q] == [1000, 1001, 1002] and len(s) == 5  # test split; train only (no restval)
    assert Path(q[0].media[0]).parent.name == "val2014" and _media_exist(q + s)
    assert q[0].fields["captions"] == ["A photo of colour 0.", "Colour number 0 fills the picture."]
    items = task.format_example(s[0], with_answer=True)
    assert isinstance(items[0], Path) and items[1] == f"Output: A photo of colour 3.{EOC}"
    assert task.format_example(q[0], with_answer=False)[1:] == ["Output:"]
    assert task.postprocess(" a red square.\nOutput: more") == "a red square."
    assert task.postprocess(" a cat Output: a dog") == "a cat"


def test_flickr30k_karpathy_with_restval(specs):
    task = build_task(specs["flickr30k_captioning"])
    assert task.name == "flickr30k"
    assert len(task.support()) == 6 and _media_exist(task.queries() + task.support())


@pytest.mark.parametrize("kind", ["vqav2", "ok_vqa"])
def test_vqa_format(specs, kind):
    task = build_task(specs[kind])
    assert task.name == kind and task.metric == "vqa_accuracy"
    q, s = task.queries(), task.support()
    assert [ex.id for ex in q] == [5001, 5011, 5021] and len(s) == 5
    assert Path(q[0].media[0]).name == "COCO_val2014_000000000500.jpg"  # data_subtype from the questions json
    assert Path(s[0].media[0]).name == "COCO_train2014_000000000000.jpg"
    assert _media_exist(q + s)
    assert q[1].fields["answers"] == ["red"] * 6 + ["Red."] * 2 + ["two"] * 2 and q[1].fields["answer"] == "red"
    assert task.format_example(q[1], with_answer=True)[1] == f"Question: what is in picture 1? Answer: red{EOC}"
    assert task.format_example(q[1], with_answer=False)[1] == "Question: what is in picture 1? Answer:"
    # OpenFlamingo's post-processing: stop at a new "Question"/"Answer", or at ", "
    assert task.postprocess(" red Question: what") == "red"
    assert task.postprocess(" red, blue") == "red"
    # official accuracy: "Red." matches after normalisation (annotators disagree); "two" matches 2 of 10
    preds = [Prediction("2"), Prediction("Red"), Prediction("two")]
    assert task.score(preds, q)["vqa_accuracy"] == pytest.approx(100 * (1.0 + 1.0 + 0.0) / 3)
    assert task.score([Prediction("two")], [q[1]])["vqa_accuracy"] == pytest.approx(60.0)


def test_vizwiz_native_json(specs):
    task = build_task(specs["vizwiz"])
    q, s = task.queries(), task.support()
    assert len(q) == 3 and len(s) == 5 and _media_exist(q + s)
    assert q[0].id == "VizWiz_val_00000000.jpg" and q[0].fields["answer"] == "unanswerable"
    assert Path(s[0].media[0]).parent.name == "train"
    # the official leave-one-out over VizWiz's records (no answer_id): holding out one of ten identical
    # {"answer": "blue", "answer_confidence": "yes"} records removes all ten, so even a unanimous answer scores 0
    scores = task.score(["unanswerable", "blue", "red"], q)
    assert scores["vqa_accuracy"] == 0.0 and scores["vqa_accuracy/other"] == 0.0


def test_textvqa_native_json(specs):
    task = build_task(specs["textvqa"])
    q = task.queries()
    assert [ex.id for ex in q] == [100, 101, 102] and _media_exist(q)
    assert Path(q[0].media[0]).name == f"{100:016x}.jpg"
    assert q[0].fields["answer"] == "stop"  # most common answer
    assert task.score(["stop sign"] * 3, q)["vqa_accuracy"] == pytest.approx(90.0)  # 3 of 10 annotators


def test_hateful_memes_jsonl(specs):
    task = build_task(specs["hateful_memes"])
    assert task.kind == "rank" and task.metric == "roc_auc"
    q = task.queries()
    assert [ex.id for ex in q] == [20000, 20001, 20002, 20003] and _media_exist(q + task.support())
    assert task.candidates(q[0]) == ["no", "yes"] and task.answer(q[1]) == "yes"
    assert task.format_example(q[1], True)[1] == f'is an image with written: "meme text 1" on it. Is it hateful? Answer: yes{EOC}'
    # ROC-AUC from P(yes) = softmax of the candidate scores; labels 0, 1, 0, 1
    preds = [Prediction("yes" if s > 0 else "no", scores={"no": 0.0, "yes": s}) for s in (-2.0, -0.5, -1.0, 0.5)]
    assert positive_probability(preds[3]) == pytest.approx(1 / (1 + 2.718281828459045 ** -0.5))
    scores = task.score(preds, q)
    assert scores["roc_auc"] == pytest.approx(100.0)  # positives (-0.5, 0.5) outrank negatives (-2, -1)
    assert scores["accuracy"] == pytest.approx(75.0)  # predicted no, no, no, yes
    # now a negative gets the highest P(yes): each positive beats one negative of two -> AUC 1/2
    scores = task.score([Prediction("yes", scores={"no": 0.0, "yes": 1.0})] + preds[1:], q)
    assert scores["roc_auc"] == pytest.approx(50.0) and scores["accuracy"] == pytest.approx(50.0)


def test_classification_list_file_and_class_folder(specs):
    task = build_task(specs["imagenet"])
    assert task.kind == "rank" and task.class_names == CLASSES
    q = task.queries()
    assert [ex.fields["label"] for ex in q] == [0, 1, 2] and _media_exist(q + task.support())
    assert task.candidates(q[0]) == CLASSES and task.answer(q[2]) == "blue thing"
    assert task.format_example(q[2], True)[1] == f"Output: blue thing{EOC}"
    preds = [Prediction("red thing", scores={"red thing": 0, "green thing": -1, "blue thing": -2}),
             Prediction("red thing", scores={"red thing": 0, "green thing": -1, "blue thing": -2}),
             Prediction("red thing", scores={"red thing": 0, "green thing": -3, "blue thing": -2})]
    assert task.score(preds, q) == pytest.approx({"top1": 100 / 3, "top5": 100.0})

    root = Path(specs["imagenet"]["list_file"]).parent / "folders"
    folder_task = Classification("folders", folder=root / "val", support_folder=root / "train",
                                 class_names={"n00000000": "red", "n00000001": "green", "n00000002": "blue"})
    assert folder_task.class_names == ["red", "green", "blue"]
    assert [folder_task.answer(ex) for ex in folder_task.queries()] == ["red", "green", "blue"]
    assert len(folder_task.support()) == 6
    with pytest.raises(ValueError):
        Classification("bad", list_file=specs["imagenet"]["list_file"], folder=root / "val", class_names=CLASSES)


def test_video_qa_msvd_style(specs):
    task = build_task(specs["msvd_qa"])
    q = task.queries()
    assert [ex.id for ex in q] == [7050, 7051, 7052]
    assert Path(q[0].media[0]).name == "vid50.mp4" and _media_exist(q + task.support())
    assert task.format_example(q[0], True)[1] == f"Question: what colour comes first? Answer: colour0{EOC}"
    assert task.score(["Colour0", "colour2", "the colour2."], q)["top1"] == pytest.approx(200 / 3)
    # without a name format, "video" / "video_id" name the file, extension found in the folder
    spec = {k: v for k, v in specs["msvd_qa"].items() if k != "video_name_format"}
    with pytest.raises(FileNotFoundError):
        build_task(spec).queries()  # ids 50.. are not file stems ("vid50")


def test_vatex_video_captioning(specs):
    task = build_task(specs["vatex"])
    assert task.metric == "cider" and task.num_frames == 3
    q = task.queries()
    assert q[0].id == "valVid-000_000010_000020" and Path(q[0].media[0]).suffix == ".mp4" and _media_exist(q)
    assert q[1].fields["captions"] == ["A clip of colour 1.", "Colour 1 then colour 2."]


def test_load_video_samples_frames_uniformly(tmp_path):
    write_video(tmp_path / "v.mp4", [0, 1, 2, 3, 4, 5, 6, 7])
    video = load_video(tmp_path / "v.mp4", num_frames=4)
    assert isinstance(video, Video) and len(video.frames) == 4
    # centres of 4 equal segments of 8 frames: 1, 3, 5, 7
    for frame, k in zip(video.frames, [1, 3, 5, 7]):
        pixel = frame.getpixel((16, 16))
        assert max(abs(a - b) for a, b in zip(pixel, COLOURS[k])) < 40, (k, pixel)
    assert len(load_video(tmp_path / "v.mp4", num_frames=20).frames) == 8  # never more frames than the video has


def test_registry_and_custom_task(tmp_path):
    assert {"coco_captioning", "flickr30k_captioning", "vqav2", "ok_vqa", "vizwiz", "textvqa", "hateful_memes",
            "imagenet", "classification", "msvd_qa", "msrvtt_qa", "video_qa", "vatex", "video_captioning"} <= set(TASK_TYPES)

    @register_task("toy_counting")
    class Counting(Task):
        kind = "generate"
        prompt = "How many? Answer:"

        def __init__(self, name="counting", n=2, **options):
            super().__init__(name, **options)
            self.n = n

        def queries(self):
            return [Example(i, [Image.new("RGB", (8, 8))], {"answer": str(i)}) for i in range(self.n)]

    task = build_task({"type": "toy_counting", "n": 3, "num_beams": 1, "prompt": "Count: "})
    assert task.name == "counting" and len(task.queries()) == 3 and task.num_beams == 1 and task.prompt == "Count: "
    assert Counting.num_beams == 3  # overrides are per instance
    task = build_task({"type": "flamingo_vlm.evaluation.tasks:VideoQA", "qa_json": __file__, "video_dir": str(tmp_path)})
    assert task.name == "msvd_qa"
    with pytest.raises(ValueError, match="unknown task type"):
        build_task({"type": "nope"})
    with pytest.raises(ValueError, match=r"task 'toy_counting': unknown Counting key\(s\) 'num_beam' \(did you mean 'num_beams'\?\)"):
        build_task({"type": "toy_counting", "num_beam": 1})  # a key of Task's, reached through **options
    with pytest.raises(ValueError, match=r"unknown Counting key\(s\) 'bogus'; known keys: answer_prefix, .*\bn, name, num_beams"):
        build_task({"type": "toy_counting", "bogus": 1})
    with pytest.raises(ValueError, match=r"unknown CocoCaptioning key\(s\) 'karpathy_jsn' \(did you mean 'karpathy_json'\?\)"):
        build_task({"type": "coco_captioning", "karpathy_jsn": "x.json", "image_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError):
        build_task({"type": "coco_captioning", "karpathy_json": str(tmp_path / "missing.json"), "image_dir": str(tmp_path)})


def test_imagenet_builtin_class_names():
    from flamingo_vlm.evaluation.tasks.classification import imagenet_class_names

    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[1] == "goldfish" and names[-1] == "toilet paper"
    assert names[207] == "Golden Retriever" and names[281] == "tabby cat"  # sorted-wnid indices (n02099601, n02123045)


def test_ilsvrc2012_devkit_ground_truth(tmp_path):
    """A devkit whose ILSVRC2012_IDs are not in sorted-wnid order: labels must follow the sorted wnids."""
    scipy_io = pytest.importorskip("scipy.io")
    import numpy as np

    from flamingo_vlm.evaluation.tasks.classification import read_ilsvrc2012_val

    # ILSVRC2012_ID 1..1000 -> wnids in a shuffled order (as the real devkit: ID 1 is n02119789, not n01440764),
    # plus a non-leaf ancestor synset that must be ignored
    wnids = [f"n{10000000 + 7 * i:08d}" for i in range(1000)]
    shuffled = [wnids[(i * 389) % 1000] for i in range(1000)]  # 389 is coprime with 1000: a permutation
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    rows = [(i + 1, w, 0) for i, w in enumerate(shuffled)] + [(1001, "n00001740", 2)]
    synsets = np.array(rows, dtype=dtype)
    (tmp_path / "data").mkdir()
    scipy_io.savemat(str(tmp_path / "data" / "meta.mat"), {"synsets": synsets})
    (tmp_path / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n1000\n")
    examples = read_ilsvrc2012_val(tmp_path, tmp_path / "val")
    assert [ex.id for ex in examples] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000003.JPEG"]
    # by hand: ID 1 -> shuffled[0] = wnids[0] -> index 0; ID 2 -> wnids[389] -> 389; ID 1000 -> wnids[999*389 % 1000] = wnids[611]
    assert [ex.fields["label"] for ex in examples] == [0, 389, 611]
    task = build_task({"type": "imagenet", "devkit_dir": str(tmp_path), "image_root": str(tmp_path / "val")})
    assert task.class_names[0] == "tench" and task.answer(task.queries()[1]) == task.class_names[389]
