"""FlamingoProcessor: interleaved and placeholder prompts -> input_ids, pixel_values, frame_mask, labels."""

import pytest
import torch

from flamingo_vlm import FlamingoProcessor, ImageTransform, Video, add_special_tokens
from flamingo_vlm.modeling.vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from flamingo_vlm.processing import make_labels, stack_media
from flamingo_vlm.tiny import make_tokenizer

from helpers import BLUE, GREEN, RED, WHITE, image

SIZE = 32


@pytest.fixture(scope="module")
def processor():
    tokenizer = make_tokenizer()
    add_special_tokens(tokenizer)
    return FlamingoProcessor(tokenizer, ImageTransform(SIZE, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))


def _media_count(processor, ids):
    return (ids == processor.media_token_id).sum(dim=1).tolist()


def test_interleaved_single_sample(processor):
    batch = processor(["An image of", image(RED), "a red thing.<|endofchunk|>", image(BLUE), "Output:"])
    ids = batch["input_ids"]
    assert ids.ndim == 2 and ids.shape[0] == 1
    assert batch["attention_mask"].shape == ids.shape and bool(batch["attention_mask"].all())
    assert batch["pixel_values"].shape == (2, 1, 3, SIZE, SIZE)
    assert "frame_mask" not in batch
    assert _media_count(processor, ids) == [2]
    assert (ids == processor.end_of_chunk_token_id).sum() == 1
    # the media are in prompt order and are the transformed images
    assert torch.equal(batch["pixel_values"][0, 0], processor.image_transform(image(RED)))
    assert torch.equal(batch["pixel_values"][1, 0], processor.image_transform(image(BLUE)))
    # the <image> token sits where the image was
    text = processor.tokenizer.decode(ids[0])
    assert text == "An image of<image>a red thing.<|endofchunk|><image>Output:"


def test_batch_of_samples_keeps_media_in_row_order(processor):
    batch = processor([["two cats", image(GREEN), "Output:"], [image(RED), "x", image(WHITE), "y", image(BLUE), "z"], ["no image"]])
    assert batch["input_ids"].shape[0] == 3
    assert _media_count(processor, batch["input_ids"]) == [1, 3, 0]
    pv = batch["pixel_values"]
    assert pv.shape == (4, 1, 3, SIZE, SIZE)
    for k, c in enumerate([GREEN, RED, WHITE, BLUE]):
        assert torch.equal(pv[k, 0], processor.image_transform(image(c)))


def test_text_only_has_no_pixel_values(processor):
    batch = processor(["just text"])
    assert batch["pixel_values"] is None
    assert _media_count(processor, batch["input_ids"]) == [0]


def test_openflamingo_placeholders_match_interleaved(processor):
    a = processor(text="<image>Output: red<|endofchunk|><image>Output:", images=[image(RED), image(BLUE)])
    b = processor([image(RED), "Output: red<|endofchunk|>", image(BLUE), "Output:"])
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    batch = processor(text=["<image>a", "b<image>c<image>d", "e"], images=[[image(RED)], [image(GREEN), image(BLUE)], []])
    assert _media_count(processor, batch["input_ids"]) == [1, 2, 0]
    assert batch["pixel_values"].shape[0] == 3
    assert torch.equal(batch["pixel_values"][2, 0], processor.image_transform(image(BLUE)))
    with pytest.raises(ValueError, match="2 texts but 1 image lists"):
        processor(text=["<image>a", "b"], images=[[image(RED)]])
    with pytest.raises(ValueError, match=r"one list of images per text; images\[0\] is a Image"):
        processor(text=["<image>a"], images=[image(RED)])
    with pytest.raises(ValueError, match="images must be a list of the text's images"):
        processor(text="<image>a", images=image(RED))
    with pytest.raises(ValueError, match="either interleaved `inputs` or `text`"):
        processor(["a"], text="b")
    with pytest.raises(ValueError, match="either interleaved `inputs` or `text`"):
        processor()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side(processor, side):
    batch = processor([["short", image(RED)], ["a much longer prompt with many words", image(BLUE), "Output:"]], padding_side=side)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = processor.tokenizer.pad_token_id
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0 and bool(mask[1].all())
    if side == "left":
        assert mask[0, :n_pad].sum() == 0 and bool(mask[0, n_pad:].all())
        assert (ids[0, :n_pad] == pad).all() and ids[0, -1] == processor.media_token_id
    else:
        assert bool(mask[0, :-n_pad].all()) and mask[0, -n_pad:].sum() == 0
        assert (ids[0, -n_pad:] == pad).all() and ids[0, -n_pad - 1] == processor.media_token_id
    # padding never adds or moves media
    assert _media_count(processor, ids) == [1, 1]


def test_left_and_right_padding_hold_the_same_tokens(processor):
    samples = [["a b c", image(RED)], ["d", image(BLUE), "e f g h i j"]]
    left, right = processor(samples, padding_side="left"), processor(samples, padding_side="right")
    for row in range(2):
        assert torch.equal(left["input_ids"][row][left["attention_mask"][row].bool()],
                           right["input_ids"][row][right["attention_mask"][row].bool()])
    assert torch.equal(left["pixel_values"], right["pixel_values"])


def test_videos_give_frames_and_a_frame_mask(processor):
    video = Video([image(RED), image(GREEN), image(BLUE)])
    batch = processor([["a", image(WHITE), "b", video, "c"], ["d", Video([image(GREEN), image(RED)]), "e"]])
    pv = batch["pixel_values"]
    assert pv.shape == (3, 3, 3, SIZE, SIZE)  # [M, T, C, H, W]
    assert batch["frame_mask"].tolist() == [[True, False, False], [True, True, True], [True, True, False]]
    assert _media_count(processor, batch["input_ids"]) == [2, 1]  # a video is one medium
    assert torch.equal(pv[1, 2], processor.image_transform(image(BLUE)))
    assert torch.equal(pv[2, 1], processor.image_transform(image(RED)))
    assert (pv[0, 1:] == 0).all() and (pv[2, 2] == 0).all()  # padding frames are zeros
    # equal frame counts: no mask
    same = processor(["a", Video([image(RED), image(GREEN)]), "b", Video([image(BLUE), image(RED)])])
    assert same["pixel_values"].shape == (2, 2, 3, SIZE, SIZE) and "frame_mask" not in same


def test_preprocessed_tensors(processor):
    img = torch.randn(3, SIZE, SIZE)
    frames = torch.randn(4, 3, SIZE, SIZE)
    batch = processor(["a", img, "b", Video(frames), "c"])
    assert torch.equal(batch["pixel_values"][0, 0], img)
    assert torch.equal(batch["pixel_values"][1], frames)
    assert batch["frame_mask"].sum(1).tolist() == [1, 4]


def test_make_labels_is_the_training_rule(processor):
    batch = processor([["short", image(RED), "a"], ["a longer prompt", image(BLUE), "Output: blue"]], padding_side="right", return_labels=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    is_media = ids == processor.media_token_id
    before_first_image = is_media.long().cumsum(1) == 0  # text that sees no image is not trained
    ignored = (mask == 0) | is_media | before_first_image
    assert (mask == 0).any() and (~ignored).any()
    assert (labels[ignored] == -100).all()
    assert torch.equal(labels[~ignored], ids[~ignored])
    assert torch.equal(labels, make_labels(ids, mask, processor.media_token_id))
    # without an attention mask the pad token marks padding
    assert torch.equal(processor.make_labels(ids), labels)
    with pytest.warns(UserWarning, match=r"row\(s\) \[1\] have no loss target"):
        processor([["a", image(RED), "b"], ["text only"]], return_labels=True)


def test_add_special_tokens_is_idempotent():
    tok = make_tokenizer()
    assert tok.pad_token is None
    new = add_special_tokens(tok)
    size = len(tok)
    assert len(new) == 3 and new == list(range(size - 3, size))
    ids = tok.convert_tokens_to_ids(["<image>", "<|endofchunk|>", "<PAD>"])
    assert sorted(ids) == new and tok.pad_token == "<PAD>"
    assert add_special_tokens(tok) == []
    assert len(tok) == size and tok.convert_tokens_to_ids(["<image>", "<|endofchunk|>", "<PAD>"]) == ids
    # each special token is one token, also inside text
    enc = tok("a<image>b<|endofchunk|>")["input_ids"]
    assert ids[0] in enc and ids[1] in enc


def test_processor_requires_the_special_tokens():
    with pytest.raises(ValueError, match="add_special_tokens"):
        FlamingoProcessor(make_tokenizer(), ImageTransform(SIZE))


def test_save_pretrained_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = FlamingoProcessor.from_pretrained(tmp_path)
    assert loaded.image_transform == processor.image_transform
    assert (loaded.media_token_id, loaded.end_of_chunk_token_id) == (processor.media_token_id, processor.end_of_chunk_token_id)
    assert loaded.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    samples = [["two cats", image(RED), "Output: a red<|endofchunk|>"], [image(BLUE), "Question: what? Answer:"]]
    a, b = processor(samples), loaded(samples)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(FileNotFoundError, match="flamingo_processor.json"):
        FlamingoProcessor.from_pretrained(tmp_path / "nothing")


# ---- errors ---------------------------------------------------------------------------------------
def test_nested_list_inside_a_sample_is_an_error(processor):
    with pytest.raises(ValueError, match=r"list inside an interleaved sample.*Video"):
        processor(["a", [image(RED), image(BLUE)], "b"])
    with pytest.raises(ValueError, match=r"list inside an interleaved sample"):
        processor([["a", [image(RED)]], ["b"]])


def test_literal_media_token_plus_an_image_is_a_count_mismatch(processor):
    with pytest.raises(ValueError, match=r"sample 0: the text holds 2 <image> token\(s\) but 1 media"):
        processor(["<image> a picture", image(RED), "Output:"])
    with pytest.raises(ValueError, match=r"sample 1: the text holds 1 <image> token\(s\) but 0 media"):
        processor([["a", image(RED)], ["<image> b"]])
    with pytest.raises(ValueError, match=r"holds 1 <image> token\(s\) but 2 media"):
        processor(text="<image>a", images=[image(RED), image(BLUE)])


@pytest.mark.parametrize("bad", [torch.randn(SIZE, SIZE), torch.randn(1, 3, SIZE, SIZE), torch.randn(1, SIZE, SIZE)])
def test_image_tensor_of_wrong_rank_is_an_error(processor, bad):
    with pytest.raises(ValueError, match=r"preprocessed image tensor must be \[C, H, W\] with C=3"):
        processor(["a", bad])


@pytest.mark.parametrize("bad", [torch.randn(3, SIZE, SIZE), torch.randn(1, 2, 3, SIZE, SIZE), torch.randn(2, 1, SIZE, SIZE)])
def test_video_tensor_of_wrong_rank_is_an_error(processor, bad):
    with pytest.raises(ValueError, match=r"preprocessed video tensor must be \[T, C, H, W\] with C=3"):
        processor(["a", Video(bad)])


def test_integer_pixel_tensors_are_an_error(processor):
    with pytest.raises(ValueError, match="image tensor must be float"):
        processor(["a", torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="video tensor must be float"):
        processor(["a", Video(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.long))])


def test_other_input_errors(processor):
    with pytest.raises(ValueError, match="at least one frame"):
        processor(["a", Video([])])
    with pytest.raises(ValueError, match="must be a list of items"):
        processor("just a string")
    with pytest.raises(ValueError, match=r"share one \[C, H, W\] size"):
        processor(["a", torch.randn(3, SIZE, SIZE), torch.randn(3, 16, 16)])
    with pytest.raises(ValueError, match="failed to decode image bytes"):
        processor(["a", b"not an image"])


def test_stack_media():
    a, b = torch.randn(1, 3, 4, 4), torch.randn(3, 3, 4, 4)
    out = stack_media([a, b])
    assert out["pixel_values"].shape == (2, 3, 3, 4, 4)
    assert torch.equal(out["pixel_values"][0, 0], a[0]) and torch.equal(out["pixel_values"][1], b)
    assert out["frame_mask"].tolist() == [[True, False, False], [True, True, True]]
    assert stack_media([]) == {"pixel_values": None}


def test_empty_inputs_are_an_error():
    from helpers import build

    _, processor = build("gpt2")
    with pytest.raises(ValueError, match="nothing to process"):
        processor([])
