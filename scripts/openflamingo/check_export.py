"""Load a `flamingo convert to-openflamingo` export into OpenFlamingo itself and compare with a fixture's logits.

Run with the python of an OpenFlamingo environment (scripts/openflamingo/make_env.sh):

    flamingo convert openflamingo tests/fixtures/openflamingo-gpt_neox/checkpoint.pt \\
        --lm tests/fixtures/openflamingo-gpt_neox/lm --vision tests/fixtures/openflamingo-gpt_neox/vision.safetensors \\
        --vision-head-width 4 --vision-post-norm --out /tmp/neox
    flamingo convert to-openflamingo /tmp/neox --out /tmp/neox-export/checkpoint.pt
    .venv-openflamingo/bin/python scripts/openflamingo/check_export.py tests/fixtures/openflamingo-gpt_neox \\
        /tmp/neox-export/checkpoint.pt --tokenizer /tmp/neox-export/checkpoint_tokenizer

Builds OpenFlamingo's model as make_fixture.py did (the fixture's LM, the exported tokenizer), loads the export as
OpenFlamingo's own code loads checkpoints (``load_state_dict(..., strict=False)``), and checks: no unexpected key
(a key OpenFlamingo's model lacks would be dropped silently, as transformers 5's GPT-NeoX ``lm_head`` would be),
only frozen backbone weights missing, the token ids of the fixture, and the logits and greedy generation of
the fixture.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from make_fixture import CROSS_ATTN_EVERY_N_LAYERS, VISION_MODEL, register_tiny_vit  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("fixture", help="a fixture directory written by make_fixture.py")
    parser.add_argument("checkpoint", help="the exported checkpoint.pt")
    parser.add_argument("--tokenizer", required=True, help="the tokenizer directory written beside the export")
    args = parser.parse_args()

    from open_flamingo import create_model_and_transforms
    from safetensors.torch import load_file

    fixture = Path(args.fixture)
    meta = json.loads((fixture / "meta.json").read_text())
    tensors = load_file(fixture / "tensors.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        register_tiny_vit(Path(tmp))
        model, _, tokenizer = create_model_and_transforms(
            clip_vision_encoder_path=VISION_MODEL, clip_vision_encoder_pretrained=None,
            lang_encoder_path=str(fixture / "lm"), tokenizer_path=args.tokenizer, cross_attn_every_n_layers=CROSS_ATTN_EVERY_N_LAYERS,
        )
    model.eval()
    model.vision_encoder.load_state_dict(load_file(fixture / "vision.safetensors"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endofchunk|>", "<image>", "<PAD>")}
    problems = []
    if ids != meta["token_ids"]:
        problems.append(f"token ids {ids} != the fixture's {meta['token_ids']}")
    result = model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True), strict=False)
    if result.unexpected_keys:
        problems.append(f"keys OpenFlamingo's model does not have (dropped silently): {result.unexpected_keys}")
    trained = [k for k in result.missing_keys if k.startswith("perceiver.") or "gated_cross_attn" in k or k.startswith("lang_encoder.") and "embed" in k]
    trained = [k for k in trained if "old_decoder_blocks" not in k and not k.startswith("lang_encoder.gated_cross_attn_layers")]
    if trained:
        problems.append(f"trained weights missing from the export: {trained}")

    mask = tensors["attention_mask"]
    with torch.no_grad():
        logits = model(vision_x=tensors["vision_x"], lang_x=tensors["input_ids"], attention_mask=mask).logits
        generated = model.generate(
            vision_x=tensors["vision_x"], lang_x=tensors["input_ids"], attention_mask=mask, max_new_tokens=meta["max_new_tokens"],
            num_beams=1, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )
    diff = float((logits.float()[mask.bool()] - tensors["logits_a"][mask.bool()]).abs().max())
    if not diff < 1e-5:
        problems.append(f"logits differ from the fixture's by {diff:.3g}")
    if not torch.equal(generated, tensors["generated"]):
        problems.append("greedy generation differs from the fixture's")
    print(f"{fixture.name}: logits max |diff| {diff:.3g}, {len(result.missing_keys)} frozen keys not in the export")
    for p in problems:
        print(f"  PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
