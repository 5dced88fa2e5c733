"""Streaming: sharded per rank and per worker, the same global batches on any number of processes,
exact resume from a lane position, and broken shards skipped and counted."""

from __future__ import annotations

import pytest

from flamingo_vlm.data import DatasetStream, LaneState, PairsFormat, StreamSpec, TokenLayout, default_lanes
from flamingo_vlm.data.mixture import Mixture
from flamingo_vlm.data.stream import check_lanes, shared_lanes
from flamingo_vlm.training import DatasetConfig
from train_fixtures import single_thread, pair_shards  # noqa: F401 (single_thread: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return pair_shards(tmp_path_factory.mktemp("pairs"), num_shards=3, per_shard=6)


def fmt(processor):
    return PairsFormat(TokenLayout.from_processor(processor), processor.image_transform)


def keys(samples):
    return [s.key.rsplit("#", 1)[1] for s in samples]


def global_batches(processor, shards, *, world_size, steps, lanes=2, batch_size=4, num_workers=0, states=None, seed=0):
    """The global batch of each step as the ranks of a world_size run read it."""
    spec = StreamSpec("pairs", tuple(shards), lanes=lanes, seed=seed, shuffle_buffer=4)
    streams = [DatasetStream(spec, fmt(processor), batch_size=batch_size, rank=r, world_size=world_size, num_workers=num_workers, states=states)
               for r in range(world_size)]
    out = []
    for _ in range(steps):
        # rank r holds slots [r B / W, (r + 1) B / W) of the global batch: the ranks in order are the batch
        out.append([k for s in streams for k in keys(s.next_samples())])
    states = {}
    for s in streams:
        states.update({lane: st for lane, st in s.states.items()})
        s.close()
    return out, states


def test_global_batches_do_not_depend_on_the_number_of_processes_or_workers(processor, shards):
    one, _ = global_batches(processor, shards, world_size=1, steps=6)
    two, _ = global_batches(processor, shards, world_size=2, steps=6)
    assert one == two
    workers, _ = global_batches(processor, shards, world_size=1, steps=6, num_workers=2)
    assert workers == one
    # each rank reads only its own shards: lane l reads shards l, l + lanes, ...
    assert {k[:5] for batch in two for k in batch[0::2]} == {"pairs"}
    spec = StreamSpec("pairs", tuple(shards), lanes=2)
    assert [u for u, _, _ in spec.lane_shards(0)] == [shards[0], shards[2]] and [u for u, _, _ in spec.lane_shards(1)] == [shards[1]]


def test_each_lane_epoch_reads_every_record_once_in_a_shuffled_order(processor, shards):
    batches, _ = global_batches(processor, shards, world_size=1, steps=6, lanes=1, batch_size=3)
    seen = [k for b in batches for k in b]
    assert sorted(seen) == sorted(f"pairs{i:05d}" for i in range(18))  # one epoch = 18 records
    assert seen != sorted(seen)  # shuffled
    other, _ = global_batches(processor, shards, world_size=1, steps=6, lanes=1, batch_size=3, seed=1)
    assert [k for b in other for k in b] != seen  # the seed matters


def test_resume_from_lane_states_continues_exactly(processor, shards):
    straight, _ = global_batches(processor, shards, world_size=1, steps=9)
    first, states = global_batches(processor, shards, world_size=1, steps=4)
    assert first == straight[:4]
    state_dicts = {lane: LaneState.from_dict(s.to_dict()) for lane, s in states.items()}  # through JSON-able dicts
    rest, _ = global_batches(processor, shards, world_size=2, steps=5, states=state_dicts)  # and on 2 processes
    assert rest == straight[4:]


def test_resume_within_a_shard_shared_by_lanes_continues_exactly(processor, shards):
    straight, _ = global_batches(processor, shards[:1], world_size=1, steps=8, lanes=2, batch_size=2)
    for cut in (1, 2, 4):
        _, states = global_batches(processor, shards[:1], world_size=1, steps=cut, lanes=2, batch_size=2)
        assert all(s.buffer for s in states.values())  # mid-epoch: records wait in the buffers
        rest, _ = global_batches(processor, shards[:1], world_size=2, steps=8 - cut, lanes=2, batch_size=2,
                                 states={lane: LaneState.from_dict(s.to_dict()) for lane, s in states.items()})
        assert rest == straight[cut:], cut


def test_fewer_shards_than_lanes_split_records_by_stride(processor, shards):
    spec = StreamSpec("pairs", tuple(shards[:1]), lanes=4)
    assert [spec.lane_shards(lane) for lane in range(4)] == [[(shards[0], 4, k)] for k in range(4)]
    batches, _ = global_batches(processor, shards[:1], world_size=2, steps=3, lanes=2, batch_size=2)
    seen = [k for b in batches for k in b]
    assert sorted(seen) == [f"pairs{i:05d}" for i in range(6)]


def test_broken_and_missing_shards_are_skipped_and_counted(processor, shards, tmp_path):
    truncated = tmp_path / "truncated.tar"
    data = open(shards[0], "rb").read()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    missing = str(tmp_path / "missing.tar")
    spec = StreamSpec("pairs", (str(truncated), missing, shards[1]), lanes=1, shuffle=False)
    stream = DatasetStream(spec, fmt(processor), batch_size=4)
    seen = []
    for _ in range(4):
        seen += keys(stream.next_samples())
    counts = stream.counts()
    assert counts["bad_shard"] >= 2  # the truncated shard and the missing one, each epoch
    assert {k for k in seen} >= {f"pairs{i:05d}" for i in range(6, 12)}


def test_default_lanes_split_a_rank_batch_evenly_among_workers():
    assert default_lanes(12, 1, 0) == 1
    assert default_lanes(12, 1, 4) == 4
    assert default_lanes(4, 1, 3) == 2
    assert default_lanes(8, 2, 2) == 4
    with pytest.raises(ValueError, match="divisible"):
        DatasetStream(StreamSpec("x", ("a",), lanes=2), None, batch_size=3, world_size=2)


def test_mixture_strategies(processor, shards):
    datasets = [DatasetConfig(name="a", format="pairs", paths=shards[:2], batch_size=2),
                DatasetConfig(name="b", format="pairs", paths=shards[2:], batch_size=3)]  # different lengths
    acc = Mixture(datasets, processor, strategy="accumulate")
    rr = Mixture(datasets, processor, strategy="round_robin")
    for step in range(8):  # "b" (6 records) wraps into new epochs while "a" (12) does not: no equal lengths needed
        assert [(d, len(s)) for d, s in acc.next_samples(step)] == [(0, 2), (1, 3)]
        assert [(d, len(s)) for d, s in rr.next_samples(step)] == [(step % 2, 2 if step % 2 == 0 else 3)]
    assert acc.streams[1].states[0].epoch == 3 and acc.streams[0].states[0].epoch == 1
    acc.close()
    rr.close()


def test_any_number_of_processes_dividing_the_batch_reads_the_same_batches(processor, shards):
    one, _ = global_batches(processor, shards, world_size=1, steps=6, lanes=2, batch_size=6)
    three, _ = global_batches(processor, shards, world_size=3, steps=6, lanes=2, batch_size=6)  # 2 lanes on 3 processes
    assert three == one
    # a checkpoint of 2 processes resumes on 3 (and on 6) with the batches of the uninterrupted run
    _, states = global_batches(processor, shards, world_size=2, steps=2, lanes=2, batch_size=6)
    for world in (3, 6):
        rest, _ = global_batches(processor, shards, world_size=world, steps=4, lanes=2, batch_size=6,
                                 states={lane: LaneState.from_dict(s.to_dict()) for lane, s in states.items()})
        assert rest == one[2:]


@pytest.mark.parametrize("lanes,batch,world", [(2, 6, 3), (4, 8, 8), (3, 12, 2), (6, 12, 4), (4, 16, 4), (1, 4, 4), (8, 8, 2)])
def test_ranks_split_the_slots_and_count_every_lane_once(lanes, batch, world):
    streams = [DatasetStream(StreamSpec("x", ("a",), lanes=lanes), None, batch_size=batch, rank=r, world_size=world) for r in range(world)]
    slots = [slot for s in streams for slot in range(*s.slots)]
    assert slots == list(range(batch))  # the ranks' slots, in rank order, are the global batch
    per_lane = batch // lanes
    for s in streams:  # a rank reads exactly the lanes its slots come from
        assert s.lanes == sorted({slot // per_lane for slot in range(*s.slots)})
    assert sorted(lane for s in streams for lane in s.counted) == list(range(lanes))
    readers = [sum(lane in s.lanes for s in streams) for lane in range(lanes)]
    assert shared_lanes(lanes, batch, world) == sum(n > 1 for n in readers)
    if lanes % world == 0:  # the usual case: each rank reads only its own lanes
        assert readers == [1] * lanes


def test_lanes_must_divide_the_batch_but_not_be_a_multiple_of_the_processes():
    check_lanes("x", 2, 6, 3)
    with pytest.raises(ValueError, match="lanes=4 must divide batch_size=6"):
        check_lanes("x", 4, 6, 3)
    with pytest.raises(ValueError, match="batch_size=6 .* not divisible by the 4 processes"):
        check_lanes("x", 2, 6, 4)


def test_shuffle_buffer_mixes_shards_and_resumes_exactly(processor, shards):
    spec = StreamSpec("pairs", tuple(shards), lanes=1, shuffle_buffer=8)
    shard_of = {f"pairs{i:05d}": i // 6 for i in range(18)}

    def run(states, steps, workers=0):
        stream = DatasetStream(spec, fmt(processor), batch_size=3, num_workers=workers, states=states)
        out = [keys(stream.next_samples()) for _ in range(steps)]
        saved = {lane: LaneState.from_dict(s.to_dict()) for lane, s in stream.states.items()}
        stream.close()
        return out, saved

    straight, _ = run(None, 12)  # two epochs of 18 records
    first_epoch = [k for b in straight[:6] for k in b]
    assert sorted(first_epoch) == sorted(shard_of)  # every record once per epoch
    origin = [shard_of[k] for k in first_epoch]
    # records of different shards interleave: some shard is left and later came back to
    assert any(origin[i] != origin[i + 1] and origin[i] in origin[i + 2 :] for i in range(len(origin) - 2))
    spans = 0
    for cut in (1, 2, 3, 5, 6, 8):
        head, saved = run(None, cut)
        spans += len({s for s, _ in saved[0].buffer}) > 1
        rest, _ = run(saved, 12 - cut)
        assert head + rest == straight, cut
    assert spans  # some resume point had a buffer holding records of two shards
    # and with DataLoader workers
    head, saved = run(None, 4, workers=1)
    rest, _ = run(saved, 8, workers=1)
    assert head + rest == straight


def test_resume_with_two_workers_continues_exactly(processor, shards):
    straight, _ = global_batches(processor, shards, world_size=1, steps=9, num_workers=2)
    first, states = global_batches(processor, shards, world_size=1, steps=4, num_workers=2)
    rest, _ = global_batches(processor, shards, world_size=1, steps=5, num_workers=2,
                             states={lane: LaneState.from_dict(s.to_dict()) for lane, s in states.items()})
    assert first + rest == straight
    one, _ = global_batches(processor, shards, world_size=1, steps=9)
    assert straight == one


def test_a_two_process_checkpoint_resumes_on_three_through_the_mixture(processor, shards):
    """The trainer's path: each rank's Mixture.state_dict merged as train() saves it, then read by 3 ranks."""
    from flamingo_vlm.training.loop import _merge_data_states

    datasets = [DatasetConfig(name="p", format="pairs", paths=shards[:2], batch_size=6, shuffle_buffer=5)]  # lanes: the default

    def run(world, steps, state=None):
        ranks = [Mixture(datasets, processor, rank=r, world_size=world, state=state) for r in range(world)]
        out = [[k for m in ranks for k in keys(m.next_samples(step)[0][1])] for step in range(steps)]
        merged = _merge_data_states([m.state_dict() for m in ranks])
        for m in ranks:
            m.close()
        return out, merged

    straight, _ = run(2, 6)  # 2 lanes (one per process, one shard each); 2 steps = an epoch of the 12 records
    assert sorted(k for b in straight[2:4] for k in b) == sorted(f"pairs{i:05d}" for i in range(12))
    _, saved = run(2, 3)  # mid-epoch
    assert saved["p"]["lanes"] == 2
    rest, _ = run(3, 3, saved)  # 2 lanes on 3 processes: no record lost or repeated, the same order
    assert rest == straight[3:]
