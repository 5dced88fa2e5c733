"""The one label rule: the processor's ``return_labels`` trains the loss ``flamingo train`` trains."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from flamingo_vlm.data.labels import collate
from flamingo_vlm.data.samples import Sample
from flamingo_vlm.processing import make_labels
from flamingo_vlm.training.loop import DatasetBatch, forward_backward

from helpers import build, open_gates

MEDIA, PAD = 7, 0


def test_make_labels_ignores_padding_media_and_text_before_the_first_image():
    ids = torch.tensor([
        [5, 6, MEDIA, 8, 9, MEDIA, 10, PAD],  # title text, then two images
        [MEDIA, 11, 12, PAD, PAD, PAD, PAD, PAD],
        [13, 14, 15, 16, PAD, PAD, PAD, PAD],  # no image: nothing to train
    ])
    mask = (torch.arange(8)[None] < torch.tensor([[7], [3], [4]])).long()
    assert make_labels(ids, mask, MEDIA).tolist() == [
        [-100, -100, -100, 8, 9, -100, 10, -100],
        [-100, 11, 12, -100, -100, -100, -100, -100],
        [-100] * 8,
    ]
    # padding comes from the mask, not the pad id: a pad id that is also the real EOS stays a target
    eos_as_pad = torch.tensor([[MEDIA, 11, PAD, PAD]])
    assert make_labels(eos_as_pad, torch.tensor([[1, 1, 1, 0]]), MEDIA).tolist() == [[-100, 11, PAD, -100]]
    # left padding gives the same targets
    left = torch.tensor([[PAD, PAD, 5, MEDIA, 8]])
    assert make_labels(left, torch.tensor([[0, 0, 1, 1, 1]]), MEDIA).tolist() == [[-100, -100, -100, -100, 8]]


@pytest.fixture(scope="module")
def model_and_processor():
    model, processor = build("llama")
    open_gates(model, 0.5)  # the images then change the loss, so a wrong medium for a token would show
    return model, processor


def _training_loss(model, samples, processor):
    """``flamingo train``'s loss of one batch: collate, then the loop's forward/backward, normalised by the
    batch's target count (training.loop.reduce_step_stats). Returns (loss, gradients of the trained params)."""
    batch = collate(samples, pad_token_id=processor.tokenizer.pad_token_id, media_token_id=processor.media_token_id)
    model.zero_grad(set_to_none=True)
    part = DatasetBatch(index=0, weight=1.0, micro=[batch], num_targets=batch["num_targets"])
    nll_sum = forward_backward(model, [part], device=torch.device("cpu"))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return nll_sum[0] / max(batch["num_targets"], 1), grads


def _samples(batch, media_token_id: int) -> list[Sample]:
    """The rows of a right-padded processor batch as training samples (same tokens, same media)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    media = [] if batch["pixel_values"] is None else list(batch["pixel_values"])
    samples = []
    for row, keep in zip(ids, mask):
        row = row[keep]
        n = int((row == media_token_id).sum())
        samples.append(Sample(row, [media.pop(0) for _ in range(n)]))
    return samples


def test_readme_example_trains_the_loss_of_flamingo_train(model_and_processor):
    model, processor = model_and_processor
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    # the README's "Python API" example, and a batch of two rows where one starts with text before its image
    readme = processor([red, "Output: a red circle.<|endofchunk|>", blue, "Output: a blue square.<|endofchunk|>"],
                       padding_side="right", return_labels=True)
    titled = processor([["A page title. ", blue, "Output: a blue square.<|endofchunk|>"],
                        [red, "Output: a red circle.<|endofchunk|>", blue, "Output: blue.<|endofchunk|>"]],
                       padding_side="right", return_labels=True)
    for batch in (readme, titled):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        api_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        train_loss, train_grads = _training_loss(model, _samples(batch, processor.media_token_id), processor)
        torch.testing.assert_close(loss.detach(), train_loss, rtol=1e-5, atol=1e-6)
        assert api_grads.keys() == train_grads.keys() and api_grads
        for name in api_grads:
            torch.testing.assert_close(api_grads[name], train_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # the title is no target in either
    title_len = int((titled["input_ids"][0] == processor.media_token_id).nonzero()[0])
    assert title_len > 0 and (titled["labels"][0, : title_len + 1] == -100).all()


def test_rows_and_batches_without_a_target(model_and_processor):
    model, processor = model_and_processor
    red = Image.new("RGB", (64, 64), "red")
    with_image = [red, "Output: a red circle.<|endofchunk|>"]
    alone = model(**processor(with_image, padding_side="right", return_labels=True)).loss
    with pytest.warns(UserWarning, match=r"row\(s\) \[1\] have no loss target"):
        mixed = processor([with_image, ["Some text with no image at all."]], padding_side="right", return_labels=True)
    # a row without an image has no target: it changes neither the mean loss nor (so) the gradient
    torch.testing.assert_close(model(**mixed).loss, alone, rtol=1e-5, atol=1e-6)
    with pytest.warns(UserWarning, match="no loss target"):
        text_only = processor(["Only text here."], padding_side="right", return_labels=True)
    assert (text_only["labels"] == -100).all()
    loss = model(**text_only).loss  # nothing to predict: a zero that keeps the graph (no NaN from 0 / 0)
    assert loss.item() == 0.0 and loss.requires_grad
    assert model(**text_only, return_logits=False).loss.item() == 0.0  # the fused loss too
    # training: an image with no text after it gives a batch without targets; its loss is 0 and its
    # gradients are zeros (the loop divides by max(targets, 1)), not NaN
    with pytest.warns(UserWarning, match="no loss target"):
        image_last = processor(["Some text, then", red], padding_side="right", return_labels=True)
    train_loss, grads = _training_loss(model, _samples(image_last, processor.media_token_id), processor)
    assert train_loss.item() == 0.0 and grads and all(not g.any() for g in grads.values())
