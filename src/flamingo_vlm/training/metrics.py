"""What a run reports: a progress bar (loss, tokens/s, ETA), a JSONL file with one line per optimizer
step, and optionally TensorBoard scalars. Only the main process writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

METRICS_NAME = "metrics.jsonl"


class MetricsLogger:
    def __init__(
        self,
        output_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        log_every: int = 10,
        tensorboard: bool = False,
    ) -> None:
        self.enabled, self.log_every = enabled, log_every
        self.progress, self.total_steps = progress, total_steps
        self.file = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        path = Path(output_dir) / METRICS_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        # on resume keep the lines up to the checkpoint; the steps after it are about to be redone
        kept = []
        if start_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", math.inf) <= start_step:
                        kept.append(line)
                except ValueError:
                    continue
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)  # line-buffered: a killed run loses no finished step
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from e
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, unit="step", desc="train", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record["step"]
        if step % self.log_every == 0 or step == self.total_steps:
            if not self.progress:  # no bar (CI logs, files): a plain line instead, flushed at once
                print(f"step {step}/{self.total_steps}: loss {record['loss']:.4f}, {record['tokens_per_s']:.0f} tok/s", flush=True)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            if self.writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                        self.writer.add_scalar(key, value, step)
        self.bar.update(1)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
