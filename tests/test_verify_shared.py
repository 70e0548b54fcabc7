"""A resume's checksums, hashed by every rank of the job (``verify_checkpoint_shared``): each rank
hashes its share of the files and all ranks agree on the first problem, the one a single process
finds (``verify_checkpoint``). Two and three gloo processes on a checkpoint written here."""
import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from megareuse.atomic import file_sha256
from megareuse.engine import checkpoint as ckpt


def _checkpoint(root, flip=None):
    root.mkdir()
    names = ["a.bin", "meta.json", "state/__0_0.distcp", "state/__1_0.distcp", "state/__2_0.distcp"]
    files = {}
    for i, name in enumerate(names):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(bytes([i]) * (1000 + i))
        files[name] = {"bytes": 1000 + i, "sha256": file_sha256(root / name)}
    (root / ckpt.MANIFEST).write_text(json.dumps({"files": files}))
    for name in flip or []:
        data = bytearray((root / name).read_bytes())
        data[7] ^= 1
        (root / name).write_bytes(bytes(data))
    return root


def _rank(rank, world, store, paths, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results[rank] = [ckpt.verify_checkpoint_shared(p, rank, world) for p in paths]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_agrees_with_the_one_process_check(tmp_path, world):
    paths = [_checkpoint(tmp_path / "good"), _checkpoint(tmp_path / "late", ["state/__2_0.distcp"]),
             _checkpoint(tmp_path / "two", ["state/__1_0.distcp", "a.bin"]), tmp_path / "missing"]
    (tmp_path / "short").mkdir()
    paths.append(tmp_path / "short")  # no manifest
    want = [ckpt.verify_checkpoint(p) for p in paths]
    assert want[0] is None and "state/__2_0.distcp fails its sha256" in want[1] and "a.bin fails" in want[2]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(world, tmp_path / "store", paths, results), nprocs=world, join=True)
    assert [results[r] for r in range(world)] == [want] * world
