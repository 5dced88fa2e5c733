"""Vision features cached per distinct frame (training/feature_cache.py): the same features the encoder gives,
each distinct frame encoded once, and training with the cache is training without it."""

from __future__ import annotations

import pytest
import torch

from flamingo_vlm.training import load_train_config, train
from flamingo_vlm.training.feature_cache import VisionFeatureCache
from flamingo_vlm.training.plan import check_launch
from helpers import build
from train_fixtures import single_thread, mixture_datasets  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_cached_features_are_the_encoders_and_each_frame_is_encoded_once():
    model, _ = build("llama")
    model.eval()
    torch.manual_seed(0)
    size = model.vision_encoder.model.config.image_size
    frames = torch.randn(3, 3, size, size)  # 3 distinct frames [C, H, W]
    pixel_values = torch.stack([frames[[0, 1, 2]], frames[[1, 1, 0]], frames[[2, 0, 0]]])  # [M=3, T=3, C, H, W]
    frame_mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        expected = model.encode_vision(pixel_values, frame_mask)
    cache = VisionFeatureCache(model, max_bytes=1 << 30)
    calls = []
    model.vision_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    first = cache(pixel_values, frame_mask, torch.device("cpu"))
    assert calls == [3] and (cache.hits, cache.misses) == (3, 3)  # 6 real frames, 3 distinct: one batch of 3
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(first[1, 2], torch.zeros_like(first[1, 2]))  # padding frames are zeros, as the encoder path gives
    again = cache(pixel_values.flip(0), frame_mask.flip(0), torch.device("cpu"))
    assert calls == [3] and torch.equal(again, first.flip(0))  # all hits: nothing encoded, the same tensors
    # a full cache keeps what it has and encodes the rest every time
    small = VisionFeatureCache(model, max_bytes=first[0, 0].numel() * first.element_size())
    small(pixel_values, frame_mask, torch.device("cpu"))
    small(pixel_values, frame_mask, torch.device("cpu"))
    assert len(small._features) == 1 and small.misses == 5


def test_training_with_the_cache_is_training_without_it(tmp_path):
    datasets = mixture_datasets(tmp_path / "data")  # 12 documents and 16 pairs: 8 steps see every record twice
    runs = {}
    for cached in (False, True):
        model, processor = build("llama")
        config = load_train_config({"datasets": datasets, "steps": 8, "lr": 1e-3, "output_dir": str(tmp_path / f"run{cached}"),
                                    "checkpoint_every": 0, "save_final": False, "device": "cpu", "cache_vision_features": cached})
        runs[cached] = [h["loss"] for h in train(model, processor, config, progress=False).history]
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_the_cache_needs_a_frozen_encoder_and_replicated_backbones_across_processes(tmp_path):
    datasets = mixture_datasets(tmp_path / "data")
    base = {"datasets": datasets, "steps": 2, "output_dir": str(tmp_path / "run"), "cache_vision_features": True}
    with pytest.raises(ValueError, match="frozen vision encoder"):
        check_launch(load_train_config({**base, "train_vision_blocks": 1}), 1)
    with pytest.raises(ValueError, match="frozen_sharding: replicate"):
        check_launch(load_train_config(base), 2)
    check_launch(load_train_config({**base, "frozen_sharding": "replicate"}), 2)
    check_launch(load_train_config(base), 1)
