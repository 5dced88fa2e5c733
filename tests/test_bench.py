"""flamingo bench on the tiny preset, our side only: structure and sanity of the JSON and the table."""

from __future__ import annotations

import json

import pytest

from flamingo_vlm.benchmark.cli import resolve_preset
from flamingo_vlm.benchmark.measure import interleaved_ids
from flamingo_vlm.benchmark.spec import load_bench_config
from flamingo_vlm.cli import main


def test_bench_tiny_writes_json_and_table(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    assert main(["bench", "tiny", "repeats=2", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    ours = result["summary"]["ours"]
    assert set(result["runs"]) == {"ours"} and "ratios" not in result["summary"]

    train = ours["train"]
    assert train["step_s"] > 0 and train["tokens_per_s"] == pytest.approx(2 * 32 / train["step_s"])
    assert train["peak_mib"] >= train["peak_above_import_mib"] > 0
    assert len(result["runs"]["ours"]["train"][0]["times_s"]) == 2
    for mode in ("greedy", "beam"):
        gen = ours["generate"][mode]
        assert 0 < gen["prefill_s"] < gen["total_s"] and gen["decode_tokens_per_s"] > 0
    assert [row["images"] for row in ours["scaling"]] == [1, 3]
    for row in ours["scaling"]:
        assert row["prompt_tokens"] == 8 * row["images"]
        assert row["prefill_s"] > 0 and row["xattn_us_per_token"] > 0 and row["vision_s"] > 0
    assert ours["info"]["trainable_params"] < ours["info"]["total_params"]

    assert "| train step (s) |" in printed and "| 3 images: prefill (s) |" in printed and "| beam: decode tokens/s |" in printed

    assert main(["bench", "--report", str(out)]) == 0  # re-summarised from the JSON alone: the same table
    assert capsys.readouterr().out.strip() == printed.split("\n\nresults:")[0].strip()


def test_interleaved_ids_layout():
    ids = interleaved_ids(2, 20, 3, media_id=90, eoc_id=91, vocab=50, seed=0, open_end=True)
    assert ids.shape == (2, 20)
    assert (ids == 90).sum(1).tolist() == [3, 3] and (ids == 91).sum(1).tolist() == [2, 2]
    assert ids[0, 0] == 90 and ids[0, -1] != 91
    with pytest.raises(ValueError, match="too few"):
        interleaved_ids(1, 5, 3, media_id=90, eoc_id=91, vocab=50, seed=0)


def test_bench_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown BenchConfig key"):
        load_bench_config(resolve_preset("tiny"), ["batch=3"])
    with pytest.raises(ValueError, match="unknown workloads"):
        load_bench_config(None, ["workloads=[infer]"])
    with pytest.raises(FileNotFoundError, match="presets"):
        resolve_preset("no-such-preset")
    assert load_bench_config(resolve_preset("tiny"), ["lm.hidden_size=32"]).lm["num_hidden_layers"] == 2


def test_flops_of_grouped_query_attention_count_the_broadcast_heads():
    """Fewer key/value heads are counted as the kernel broadcasts them (torch < 2.12 refused their shapes),
    and count_flops leaves torch's counters as they were."""
    import torch
    from torch.utils import flop_counter as fc

    from flamingo_vlm.benchmark.measure import _broadcast_kv_heads, count_flops

    q, kv, full = (2, 8, 16, 4), (2, 2, 16, 4), (2, 8, 16, 4)
    assert _broadcast_kv_heads(fc.sdpa_flop_count, 0)(q, kv, kv) == fc.sdpa_flop_count(q, full, full) > 0
    assert _broadcast_kv_heads(fc.sdpa_backward_flop_count, 1)(q, q, kv, kv) == fc.sdpa_backward_flop_count(q, q, full, full) > 0
    before = fc.sdpa_flop_count, fc.sdpa_backward_flop_count
    assert count_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 2)) == 2 * 4 * 8 * 2
    assert (fc.sdpa_flop_count, fc.sdpa_backward_flop_count) == before


def test_flops_of_a_training_step_with_the_fused_head_loss():
    """The fused loss runs autograd.grad inside its forward, which FlopCounterMode's module hooks refused."""
    from flamingo_vlm.benchmark.measure import count_flops
    from helpers import BLUE, RED, build, image, open_gates

    model, processor = build("llama")
    open_gates(model, 0.5)
    model.train()
    batch = processor([[image(RED), "Output: a red circle.<|endofchunk|>", image(BLUE), "Output: a blue square."]], padding_side="right", return_labels=True)
    assert count_flops(lambda: model(**batch, return_logits=False).loss.backward()) > count_flops(lambda: model(**batch).loss) > 0
