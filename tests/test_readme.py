"""The README's Python example runs as written (on tiny local backbones)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    result = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "my-flamingo" / "model.safetensors").is_file()


def test_cli_generate_and_info(tmp_path):
    code = (
        "from flamingo_vlm import build_flamingo\n"
        "from flamingo_vlm.tiny import create_tiny_backbones\n"
        "from PIL import Image\n"
        "lm, vision = create_tiny_backbones('b')\n"
        "m, p = build_flamingo(lm, vision)\n"
        "m.save_pretrained('ckpt'); p.save_pretrained('ckpt')\n"
        "Image.new('RGB', (40, 40), 'red').save('red.png')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    cli = [sys.executable, "-m", "flamingo_vlm.cli"]
    out = subprocess.run(cli + ["generate", "--model", "ckpt", "--prompt", "<image:red.png>Output:", "--max-new-tokens", "3"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    info = subprocess.run(cli + ["info", "ckpt"], cwd=tmp_path, capture_output=True, text=True)
    assert '"media_attention": "last"' in info.stdout
    bad = subprocess.run(cli + ["generate", "--model", "ckpt", "--prompt", "<image:missing.png>Output:"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "failed to decode" in bad.stderr
