"""The sharded checkpoint format (engine/sharded.py) and the ownership of its chunks
(engine/fragments.py), without DeepSpeed: boxes against flat index sets, reads of any box against
slicing the original tensor, torch.distributed.checkpoint reading the same files, and each TP
rank's box against the cut ``shard_state_dict`` makes."""
import json

import pytest
import torch

from megareuse.config import ModelConfig
from megareuse.engine.checkpoint import CheckpointError
from megareuse.engine.fragments import Fragment
from megareuse.engine.sharded import ShardedReader, ShardedWeights, fqn, rank_file, write_chunks, write_index
from megareuse.model import GPT
from megareuse.parallel.tensor_parallel import shard_state_dict, tp_box


def flat_indices(shape, offsets, sizes):
    """Flat indices of a box of a tensor of ``shape`` (the reference: enumerate every element)."""
    index = torch.arange(torch.Size(shape).numel()).reshape(shape)
    for dim, (o, s) in enumerate(zip(offsets, sizes)):
        index = index.narrow(dim, o, s)
    return index.reshape(-1).tolist()


@pytest.mark.parametrize("shape, offsets, full", [((6, 5), (0, 0), (6, 5)), ((6, 5), (4, 0), (10, 5)),
                                                  ((3, 4), (0, 8), (3, 12)), ((7,), (0,), (7,))])
def test_boxes_are_the_owned_flat_range(shape, offsets, full):
    n = torch.Size(shape).numel()
    local = torch.arange(n).reshape(shape)  # the TP shard's elements, in its own flat order
    placed = torch.full(full, -1, dtype=torch.long)
    placed[tuple(slice(o, o + s) for o, s in zip(offsets, shape))] = local
    for start in range(n):
        for stop in range(start + 1, n + 1):
            frag = Fragment("w", None, offsets, shape, start, stop)
            got = []
            for box_offsets, sizes, s, e in frag.boxes():
                assert e - s == torch.Size(sizes).numel() and len(frag.boxes()) <= 3
                values = placed[tuple(slice(o, o + z) for o, z in zip(box_offsets, sizes))].reshape(-1).tolist()
                got.extend(values)
                assert values == list(range(start + s, start + e))  # the box holds flat [s, e) of the range
            assert got == list(range(start, stop))


def _store(tmp_path, tensors, world=3, seed=0):
    """Write ``tensors`` as chunks spread over ``world`` rank files (random flat ranges per tensor)."""
    gen = torch.Generator().manual_seed(seed)
    per_rank = [[] for _ in range(world)]
    for name, value in tensors.items():
        n = value.numel()
        cuts = sorted({0, n, *torch.randint(1, max(n, 2), (world - 1,), generator=gen).tolist()})
        for r, (a, b) in enumerate(zip(cuts, cuts[1:])):
            frag = Fragment(name, None, (0,) * value.dim(), tuple(value.shape), a, b)
            flat = value.reshape(-1)
            per_rank[r % world] += [(name, o, flat[a + s:a + e].view(z)) for o, z, s, e in frag.boxes()]
    state = tmp_path / "ckpt" / "state"
    entries = [write_chunks(state / rank_file(r), chunks) for r, chunks in enumerate(per_rank)]
    write_index(state, {k: tuple(v.shape) for k, v in tensors.items()}, [c for e in entries for c in e["chunks"]])
    return tmp_path / "ckpt", entries


def test_any_box_reads_back_exactly_and_dcp_reads_the_same_files(tmp_path):
    tensors = {fqn("w"): torch.randn(9, 7, dtype=torch.float32), fqn("b"): torch.randn(11),
               fqn("w", "exp_avg"): torch.randn(9, 7)}
    ckpt, entries = _store(tmp_path, tensors)
    reader = ShardedReader(ckpt)
    for name, value in tensors.items():
        assert torch.equal(reader.full(name), value)
    box = reader.read_into(fqn("w"), (2, 3), torch.empty(5, 4))
    assert torch.equal(box, tensors[fqn("w")][2:7, 3:7])
    # each file's entry is its bytes and sha256, as the manifest records them
    import hashlib
    for r, entry in enumerate(entries):
        data = (ckpt / "state" / rank_file(r)).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    # torch.distributed.checkpoint reads the same checkpoint (its .metadata), without a process group
    import torch.distributed.checkpoint as dcp
    target = {name: torch.zeros_like(value) for name, value in tensors.items()}
    dcp.load(target, checkpoint_id=str(ckpt / "state"), no_dist=True)
    assert all(torch.equal(target[n], tensors[n]) for n in tensors)
    weights = ShardedWeights(ckpt)
    assert sorted(weights) == ["b", "w"] and weights.shape("w") == (9, 7)


def test_incomplete_or_damaged_state_is_refused(tmp_path):
    value = torch.randn(4, 4)
    state = tmp_path / "state"
    entry = write_chunks(state / rank_file(0), [(fqn("w"), (0, 0), value[:3])])
    with pytest.raises(RuntimeError, match="model.w has 12 of its 16 elements"):
        write_index(state, {fqn("w"): (4, 4)}, entry["chunks"])
    ckpt, _ = _store(tmp_path / "good", {fqn("w"): value}, world=2)
    index = json.loads((ckpt / "state" / "index.json").read_text())
    index["chunks"][0]["offset"] += 1  # the index points into the middle of a chunk
    (ckpt / "state" / "index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"state/__\d_0.distcp: the chunk of model.w at byte 1 is not readable"):
        ShardedReader(ckpt).full(fqn("w"))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_box_is_the_shard_that_shard_state_dict_cuts(tp):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                      max_seq_len=16, tie_embeddings=False)
    full = GPT(cfg).state_dict()
    owners = {}
    for rank in range(tp):
        shard = shard_state_dict(full, cfg, (tp, rank))
        for key, value in full.items():
            offsets, sizes, primary = tp_box(key, tuple(value.shape), cfg, (tp, rank))
            cut = value[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]
            assert torch.equal(cut, shard[key]), (key, rank)
            if primary:
                owners.setdefault(key, []).extend(flat_indices(value.shape, offsets, sizes))
    for key, value in full.items():  # the primary boxes cover each tensor exactly once
        assert sorted(owners[key]) == list(range(value.numel())), key


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_write_that_fails_inside_torch_save_raises_its_own_error(tmp_path, monkeypatch, error):
    """Ctrl-C or a full disk in the middle of a chunk: the caller sees that error (the trainer's
    way out turns it into exit 130 or the full-disk line), not torch's "unexpected pos" report."""
    from megareuse.engine.sharded import ChunkWriter

    writer = ChunkWriter(tmp_path / "state" / rank_file(0))
    real, calls = writer._fh.write, []

    def failing(data):
        calls.append(len(memoryview(data)))
        if len(calls) == 3:
            raise error
        return real(data)

    monkeypatch.setattr(writer._fh, "write", failing)
    with pytest.raises(type(error)) as caught:
        writer.add(fqn("w"), (0, 0), torch.randn(64, 64))
    assert caught.value is error
    writer.abort()
    assert not (tmp_path / "state" / rank_file(0)).exists()
