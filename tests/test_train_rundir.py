"""Runs never mix: a fresh `flamingo train` refuses a directory holding another run, a resume refuses a run
made with another configuration, --overwrite starts over cleanly; every run says where it writes, how large
the model is and where it runs, and --no-progress prints periodic log lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flamingo_vlm.training.cli import main
from flamingo_vlm.training.rundir import RUN_CONFIG_NAME, prepare_run_dir
from helpers import SMALL_BRIDGE
from train_fixtures import mixture_datasets, single_thread  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


def steps_logged(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    from flamingo_vlm.tiny import create_tiny_backbones

    root = tmp_path_factory.mktemp("rundir")
    lm, clip = create_tiny_backbones(root / "backbones")
    datasets = [d for d in mixture_datasets(root / "data", lanes=1) if d["name"] == "pairs"]
    cfg = {"lm": lm, "vision": clip, "flamingo": SMALL_BRIDGE, "datasets": datasets, "steps": 2, "lr": 1e-3,
           "checkpoint_every": 1, "keep_last": 0, "log_every": 1, "device": "cpu", "save_final": False}
    path = root / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_runs_never_mix(config_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([str(config_file), f"output_dir={out}", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"flamingo train: output {out} | parameters " in printed and "trainable / " in printed and "| device cpu" in printed
    assert "step 1/2: loss " in printed and "step 2/2: loss " in printed  # --no-progress: log lines, not silence
    assert steps_logged(out) == [1, 2] and (out / RUN_CONFIG_NAME).is_file()

    # a fresh run into the used directory is refused, and nothing there changes
    before = (out / "metrics.jsonl").read_text()
    assert main([str(config_file), f"output_dir={out}", "steps=3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"output_dir {out} is not empty" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before

    # resuming with another configuration is refused, naming what differs
    assert main([str(config_file), f"output_dir={out}", "lr=0.01", "steps=3", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume the run in" in err and "lr: 0.001 -> 0.01" in err and "steps" not in err.split("configuration")[1]

    # keys that do not change what is trained may differ on resume
    assert main([str(config_file), f"output_dir={out}", "log_every=5", "keep_last=1", "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    assert steps_logged(out) == [1, 2]  # already finished: nothing redone, nothing mixed
    # and a run may be extended (or stopped early): the steps count is not what it trains
    assert main([str(config_file), f"output_dir={out}", "steps=3", "--resume", "--no-progress"]) == 0
    capsys.readouterr()
    assert steps_logged(out) == [1, 2, 3]

    # --overwrite starts over in the same directory: the old run's checkpoints are gone
    assert main([str(config_file), f"output_dir={out}", "steps=1", "save_final=true", "--overwrite", "--no-progress"]) == 0
    capsys.readouterr()
    assert steps_logged(out) == [1] and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]
    card = (out / "final" / "README.md").read_text()  # the final model's card says what it was trained on
    assert "- optimizer steps: 1" in card and "| pairs | pairs |" in card


def test_overwrite_never_deletes_what_a_run_did_not_write(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    config = {"output_dir": str(out), "resume": False, "lr": 1e-3}
    with pytest.raises(ValueError, match=r"is not empty \(thesis.tex\)"):
        prepare_run_dir(config)
    with pytest.raises(ValueError, match="holds files no training run writes \\(thesis.tex\\); refusing to delete"):
        prepare_run_dir(config, overwrite=True)
    assert (out / "thesis.tex").read_text() == "years of work"
    assert prepare_run_dir({**config, "output_dir": str(tmp_path / "new")}) == "new"
    assert prepare_run_dir({**config, "output_dir": str(tmp_path / "new"), "resume": True, "log_every": 3}) == "resume"
    with pytest.raises(ValueError, match=r"another configuration \(lr: 0.001 -> 0.002\)"):
        prepare_run_dir({**config, "output_dir": str(tmp_path / "new"), "resume": True, "lr": 2e-3})
