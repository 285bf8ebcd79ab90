"""Scoring token lists with their likeliest alternatives (research.prompt_logprobs), and the engine's top-N."""

from __future__ import annotations

import pytest
import torch

from nanoengine.engine.sampling import Sampler, SamplingParams, sample, top_alternatives
from nanoengine.research.prompt_logprobs import score_token_lists
from nanoengine.engine.runner import sequence_logprobs


def test_top_alternatives_are_the_likeliest_with_the_log_probs_sample_reports():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 1.0], [1.0, 1.0, 4.0, 0.0]])
    assert top_alternatives(logits, [0, 0, 0]) is None  # nothing asked, nothing done
    rows = top_alternatives(logits, [2, 0, 3])
    logprobs = torch.log_softmax(logits, -1)
    assert [i for i, _ in rows[0]] == [1, 3] and rows[1] == []
    assert rows[2][0][0] == 2 and {i for i, _ in rows[2][1:]} == {0, 1}  # 0 and 1 tie
    assert [v for _, v in rows[0]] == pytest.approx(logprobs[0, [1, 3]].tolist())
    tokens, chosen = sample([Sampler(SamplingParams(), 4) for _ in range(3)], logits)
    assert rows[0][0] == (int(tokens[0]), float(chosen[0]))  # the same number, bit for bit


def test_scores_are_scorings_own_and_the_alternatives_come_from_the_same_pass(smollm2):
    sequences = [smollm2.tokenizer.encode(t) for t in ["The capital of France is Paris", "1, 2, 3", "Hi"]]
    plain = score_token_lists(smollm2.model, sequences)
    ranked = score_token_lists(smollm2.model, sequences, top_n=3, batch_tokens=16)  # several passes
    assert [s.token_logprobs for s in plain] == sequence_logprobs(smollm2.model, sequences)
    for a, b, ids in zip(plain, ranked, sequences):
        assert b.token_ids == ids and b.token_logprobs == pytest.approx(a.token_logprobs, abs=1e-4)  # other padding
        assert all(len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] for top in b.top)
        for t, top in enumerate(b.top):  # a token that is the likeliest has the same value twice
            if top[0][0] == ids[t + 1]:
                assert top[0][1] == b.token_logprobs[t]
    assert ranked[1].greedy(len(sequences[1])) is True  # nothing left to check is greedy
