"""The scheduler's bookkeeping, without a model: admission, the prefill budget, row layout."""

from __future__ import annotations

import math

from nanoengine.engine.scheduler import Scheduler, Sequence


def seq(prompt_len: int, max_new_tokens: int = 10) -> Sequence:
    return Sequence(list(range(prompt_len)), max_new_tokens, math.inf)


def scheduler(rows: int = 4, chunk: int = 64) -> tuple[Scheduler, list[tuple[int, int, int]]]:
    moves: list[tuple[int, int, int]] = []
    return Scheduler(rows, chunk, lambda src, dst, n: moves.append((src, dst, n))), moves


def run(s: Scheduler, batch) -> None:
    """What the runner does to a prefill batch: the chunks enter the cache."""
    for sq, chunk in zip(batch.sequences, batch.chunks):
        sq.pos += len(chunk)
    s.prefill_done(batch)


def test_short_prompts_are_admitted_together_first_come_first_served_within_the_budget():
    s, _ = scheduler(rows=8, chunk=64)
    waiting = [seq(10), seq(20), seq(15), seq(30)]
    for w in waiting:
        s.add(w)
    batch = s.next_prefill()
    # padded to the longest: 3 x 20 = 60 <= 64, and a fourth would make 4 x 30 = 120
    assert batch.sequences == waiting[:3] and batch.first_row == 0 and batch.padded_tokens <= 64
    run(s, batch)
    assert s.decoding == waiting[:3] and list(s.waiting) == waiting[3:]
    assert s.next_prefill().sequences == waiting[3:] and s.next_prefill is not None


def test_no_more_rows_no_admission():
    s, _ = scheduler(rows=2)
    for n in (5, 5, 5):
        s.add(seq(n))
    run(s, s.next_prefill())
    assert len(s.decoding) == 2 and len(s.waiting) == 1 and s.next_prefill() is None


def test_a_long_prompt_is_prefilled_alone_chunk_by_chunk_behind_the_decoding_rows():
    s, _ = scheduler(rows=4, chunk=64)
    short, long = seq(5), seq(150)
    s.add(short)
    run(s, s.next_prefill())
    s.add(long)
    s.add(seq(3))
    sizes = []
    while not long.prefilled:
        batch = s.next_prefill()
        assert batch.sequences == [long] and batch.first_row == 1  # right after the decoding row
        sizes.append(len(batch.chunks[0]))
        run(s, batch)
        assert s.partial is (None if long.prefilled else long)
    assert sizes == [64, 64, 22] and s.decoding == [short, long] and len(s.waiting) == 1


def test_a_departure_moves_the_last_decoding_row_and_the_half_prefilled_one_down():
    s, moves = scheduler(rows=4, chunk=64)
    a, b, c, long = seq(5), seq(6), seq(7), seq(200)
    for sq in (a, b, c):
        s.add(sq)
    run(s, s.next_prefill())
    s.add(long)
    run(s, s.next_prefill())  # 64 of 200 tokens: partial, in row 3
    s.remove(a)
    assert moves == [(2, 0, c.pos), (3, 2, 64)]
    assert s.decoding == [c, b] and s.partial is long
    s.remove(b)  # the last decoding row: only the partial one moves
    assert moves[2:] == [(2, 1, 64)] and s.decoding == [c]
    s.remove(long)
    assert s.partial is None and len(moves) == 3 and len(s) == 1


def offline(prompt_len: int) -> Sequence:
    return Sequence(list(range(prompt_len)), 10, math.inf, live=False)


def test_offline_work_fills_the_pool_but_one_row_under_a_larger_budget():
    s = Scheduler(2, 64, lambda *move: None, pool_rows=6, offline_chunk=512)
    work = [offline(100) for _ in range(8)]
    for w in work:
        s.add(w)
    batch = s.next_prefill()
    assert batch.sequences == work[:5] and batch.padded_tokens == 500  # 5 rows, 500 tokens > the live budget of 64
    run(s, batch)
    assert s.next_prefill() is None  # the last row is kept for a live arrival


def test_a_live_arrival_goes_ahead_of_offline_work_and_brings_back_the_live_budget():
    s = Scheduler(2, 64, lambda *move: None, pool_rows=6, offline_chunk=512)
    work = [offline(100) for _ in range(8)]
    for w in work:
        s.add(w)
    run(s, s.next_prefill())
    live = seq(200)
    s.add(live)
    assert s.waiting[0] is live and not s.offline_only
    batch = s.next_prefill()
    assert batch.sequences == [live] and batch.chunks == [live.prompt_ids[:64]]  # the reserved row, one live chunk
    run(s, batch)
    assert s.next_prefill().chunks == [live.prompt_ids[64:128]]  # offline work waits behind it


def test_nothing_decoding_means_no_one_waits_for_a_token_so_the_budget_grows():
    s = Scheduler(4, 64, lambda *move: None, pool_rows=4, offline_chunk=256)
    first = [seq(60), seq(60), seq(60)]
    for w in first:
        s.add(w)
    assert s.next_prefill().sequences == first  # 180 padded tokens: the larger budget, nothing decodes yet
