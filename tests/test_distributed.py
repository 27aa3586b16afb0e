"""The group argument before global negatives land: world size 1 runs as usual, larger groups say so clearly."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_embeddings

from fastpair import pairwise_nce


def _worker(rank, world_size, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        zs = make_embeddings(3, 8, 4, seed=rank)
        try:
            pairwise_nce(*zs, group=dist.group.WORLD)
            outcome = "no error"
        except NotImplementedError as err:
            outcome = "NotImplementedError: " + str(err)
        with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_world_size_one_group_is_the_plain_loss():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            zs = make_embeddings(3, 8, 4)
            assert torch.equal(pairwise_nce(*zs, group=dist.group.WORLD), pairwise_nce(*zs))
        finally:
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_larger_group_raises_on_every_rank():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, f"{tmp}/init", tmp), nprocs=2, join=True)
        for rank in range(2):
            with open(os.path.join(tmp, f"rank{rank}")) as f:
                text = f.read()
            assert text.startswith("NotImplementedError") and "not implemented yet" in text, text
