"""Decode steps replayed as CUDA graphs (`engine/graphs.py`): a replay is the eager step bit for
bit, and an engine that replays them gives every family its solo tokens.

These need a CUDA GPU, so they are skipped elsewhere (CI has none); they were run on a lent H200
(README "On a GPU").
"""

from __future__ import annotations

import time

import pytest
import torch

from nanoengine import Tokenizer, load_model
from nanoengine.engine.runner import ModelRunner
from nanoengine.engine.scheduler import PrefillBatch, Sequence
from test_engine import assert_same, engine_for, family_folder, read, request, solo, submit  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def prefilled(runner: ModelRunner, prompts: list[list[int]]) -> list[Sequence]:
    """Each prompt prefilled into its own row (row i = prompts[i]), its first token picked greedily."""
    sequences = []
    for row, ids in enumerate(prompts):
        seq = Sequence(ids, 8, float("inf"))
        seq.next_token = int(runner.prefill(PrefillBatch(row, [seq], [ids]))[0].argmax())
        seq.pos = len(ids)
        sequences.append(seq)
    return sequences


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_replayed_step_is_the_eager_step_bit_for_bit(family_folder, dtype):
    """Rows 1, 3 and 5 (buckets 1, 4 and 8): each bucket's first step runs eagerly and is recorded;
    the same step again is replayed, with the same logits, and the next steps replay too."""
    model = load_model(family_folder, dtype=dtype, device="cuda")
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (5, 23, 40, 70, 9)]
    for rows in (1, 3, 5):
        runner = ModelRunner(model, 8, 256)
        sequences = prefilled(runner, prompts[:rows])
        eager = runner.decode(sequences).clone()  # (rows, V): run eagerly, then recorded
        assert len(runner.graphs.graphs) == 1 and not runner.graphs.failed
        assert torch.equal(runner.decode(sequences), eager)  # the same step, replayed
        for _ in range(3):  # later steps: new inputs through the same graph
            for seq, token in zip(sequences, runner.decode(sequences).argmax(-1).tolist()):
                seq.pos, seq.next_token = seq.pos + 1, token
        assert len(runner.graphs.graphs) == 1


def test_an_engine_replaying_graphs_gives_every_family_its_solo_tokens(family_folder, engine_for):
    """Four rows decoding 30 tokens past a 16-token window, prompts prefilled in chunks of 16,
    rows joining and leaving (their buckets change), against the single-sequence loop."""
    model, tokenizer = load_model(family_folder, device="cuda"), Tokenizer.from_folder(family_folder)
    engine = engine_for(model, tokenizer, max_batch_size=4, prefill_chunk=16)
    assert engine.runner.graphs is not None
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (5, 23, 40, 70)]
    handles = [submit(engine, request(14 + 6 * i), ids, time.monotonic() + 600) for i, ids in enumerate(prompts)]
    for i, (ids, handle) in enumerate(zip(prompts, handles)):
        assert_same(read(handle), solo(model, tokenizer, ids, 14 + 6 * i))
    assert engine.runner.graphs.graphs and not engine.runner.graphs.failed
