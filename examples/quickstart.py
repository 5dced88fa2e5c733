"""Build a Flamingo model on tiny local backbones, run a training step, generate, save and reload.

    python examples/quickstart.py [WORKDIR]

Real backbones work the same way: pass a hub name or a local path of any causal LM and CLIP/SigLIP model.
"""

import sys
import tempfile

import torch
from PIL import Image

from flamingo_vlm import build_flamingo, load_flamingo
from flamingo_vlm.tiny import create_tiny_backbones

workdir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
lm_path, vision_path = create_tiny_backbones(workdir)  # save_pretrained'ed like any checkpoint

# 1. A Flamingo model: frozen LM + frozen vision encoder + a new bridge (gates at 0: it *is* the LM).
model, processor = build_flamingo(lm_path, vision_path, cross_attn_every_n_layers=1, resampler_num_latents=16)
print(f"trainable parameters: {sum(p.numel() for _, p in model.trainable_parameters()):,}")

# 2. Interleaved text and images -> tensors -> loss, and one optimizer step.
red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
batch = processor(
    [[red, "Output: a red circle.<|endofchunk|>", blue, "Output: a blue square.<|endofchunk|>"]],
    padding_side="right", return_labels=True,
)
optimizer = torch.optim.AdamW([p for _, p in model.trainable_parameters()], lr=1e-4)
model.train()
loss = model(**batch).loss
loss.backward()
optimizer.step()
print(f"loss: {loss.item():.3f}")

# 3. Few-shot prompt -> beam search (stops at <|endofchunk|>).
model.eval()
prompt = processor([red, "Output: a red circle.<|endofchunk|>", blue, "Output:"])
out = model.generate(**prompt, max_new_tokens=8, num_beams=3)
print("generated:", repr(processor.decode(out[0, prompt["input_ids"].shape[1]:])))

# 4. Save only the trained weights, and load everything back.
model.save_pretrained(f"{workdir}/flamingo")
processor.save_pretrained(f"{workdir}/flamingo")
model, processor = load_flamingo(f"{workdir}/flamingo")
print("reloaded from", f"{workdir}/flamingo")
