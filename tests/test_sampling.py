"""Choosing tokens from logits."""

from __future__ import annotations

import math

import pytest
import torch

from nanoengine import InvalidParameterError, SamplingParams
from nanoengine.engine.sampling import Sampler

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.5, 2.9])


def draws(params: SamplingParams, n: int = 300) -> set[int]:
    sampler = Sampler(params, vocab_size=5)
    return {int(sampler(LOGITS)[0]) for _ in range(n)}


def test_greedy_takes_the_argmax():
    token, logprob = Sampler(SamplingParams(temperature=0.0), 5)(LOGITS)
    assert int(token) == 1
    assert logprob.item() == pytest.approx(torch.log_softmax(LOGITS, -1)[1].item())


def test_logprob_ignores_temperature():
    token, logprob = Sampler(SamplingParams(temperature=2.0, seed=0), 5)(LOGITS)
    assert logprob.item() == pytest.approx(torch.log_softmax(LOGITS, -1)[int(token)].item())


def test_top_k_keeps_the_k_best():
    assert draws(SamplingParams(temperature=1.0, top_k=2, seed=0)) == {1, 4}
    assert draws(SamplingParams(temperature=1.0, top_k=1, seed=0)) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, -1)  # sorted: 1 (0.39), 4 (0.35), 2 (0.14), 0 (0.05), 3 (0.03)
    assert probs[1] < 0.5 < probs[1] + probs[4]
    assert draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0)) == {1, 4}
    assert draws(SamplingParams(temperature=1.0, top_p=0.01, seed=0)) == {1}
    assert draws(SamplingParams(temperature=1.0, top_p=1.0, seed=0)) == {0, 1, 2, 3, 4}


def test_seed_makes_sampling_repeatable():
    def run(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), 5)
        return [int(sampler(LOGITS)[0]) for _ in range(50)]

    assert run(7) == run(7) and run(7) != run(8)


def test_penalties_discourage_repeats():
    logits = torch.tensor([2.0, 1.9, 0.0])
    sampler = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.5), 3)
    assert [int(sampler(logits)[0]) for _ in range(3)] == [0, 1, 0]  # 2.0 -> 1.5 after one use
    sampler = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.15), 3)
    assert [int(sampler(logits)[0]) for _ in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=2.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature="0.5"), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(presence_penalty=-1.0), "presence_penalty"),
        (dict(frequency_penalty=2.1), "frequency_penalty"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_parameters_are_named(kwargs, name):
    with pytest.raises(InvalidParameterError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-8])
def test_a_tiny_temperature_behaves_as_greedy(temperature):
    """logits / temperature would overflow float32 to inf (inf - inf = nan); shifted first, it doesn't."""
    logits = torch.tensor([3.0, 2.5, -1.0, 2.9])
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0), 4)
    assert [int(sampler(logits)[0]) for _ in range(5)] == [0] * 5


@pytest.mark.parametrize("top_p", [1e-46, 5e-324, 1e-9])
def test_a_top_p_that_masks_everything_keeps_the_most_likely_token(top_p):
    logits = torch.tensor([1.0, 3.0, 2.0])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=top_p, seed=0), 3)
    assert [int(sampler(logits)[0]) for _ in range(5)] == [1] * 5


def test_rows_of_one_batch_each_use_their_own_parameters_and_generator():
    """Greedy and sampled rows, filtered or not, share a batch; each row's tokens are what it
    would draw alone."""
    from nanoengine.engine.sampling import sample

    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, seed=1),
        SamplingParams(temperature=0.8, top_k=3, seed=2),
        SamplingParams(temperature=1.5, top_p=0.7, seed=3),
    ]
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    alone = [[int(Sampler(p, 50)(logits[i])[0])] for i, p in enumerate(params)]
    batched, _ = sample([Sampler(p, 50) for p in params], logits)
    assert [[t] for t in batched.tolist()] == alone
