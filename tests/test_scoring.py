"""Scoring texts: each text's summed log-probability equals transformers' loss times its scored
token count (within 1e-3, on texts of several hundred tokens), batched or not, and bad texts get
clear errors before any work."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nanoengine import InvalidParameterError
from nanoengine.research.scoring import length_batches, score
from test_tracing import tiny  # noqa: F401  (the family checkpoints, shared fixture)

PARAGRAPH = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a "
    "goldsmith from Mainz, combined movable metal type, oil-based ink and a wooden screw press into a "
    "system that could produce books far faster than scribes. Before him, block printing had been used "
    "in China and Korea for centuries, and movable type made of ceramic and later of metal had been "
    "tried there as well. What made Gutenberg's method spread so quickly across Europe was the "
    "combination of durable type, a matrix that let a printer cast thousands of identical letters, and "
    "an ink that stuck to metal. Within fifty years, presses were running in more than two hundred "
    "cities, and millions of books had been printed. The price of books fell, literacy rose, and ideas "
    "travelled faster than ever before: scientific results could be checked by readers in distant "
    "places, religious arguments reached ordinary people, and standard spellings began to form. "
)
TEXTS = [
    PARAGRAPH * 2,  # several hundred tokens
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n" * 6,
    "Paris is the capital of France.",
    PARAGRAPH,
    "Bonjour, je m'appelle Marie et j'habite à Lyon depuis dix ans. 🙂",
]


def reference_summed_logprob(reference: torch.nn.Module, ids: list[int]) -> float:
    """-(transformers' loss x the number of scored tokens), the loss taken in float64.

    transformers' own loss is float32 cross-entropy of its logits; over a few hundred tokens that
    reduction alone drifts by several 1e-3 from the exact value (4e-3 on the 362-token text here,
    with logits identical to ours), so the same loss, mean cross-entropy of each position's logits
    against the next token, is taken here in float64 from the reference's logits.
    """
    with torch.inference_mode():
        logits = reference(torch.tensor([ids])).logits[0]  # (T, V)
    loss = F.cross_entropy(logits[:-1].double(), torch.tensor(ids[1:]))
    return -float(loss) * (len(ids) - 1)


def test_score_equals_transformers_loss_times_token_count(smollm2, smollm2_reference):
    results = score(smollm2, TEXTS)
    assert max(len(r.token_ids) for r in results) > 300
    for text, result in zip(TEXTS, results):
        assert result.text == text
        assert result.token_ids == smollm2.tokenizer.encode(text)
        assert result.logprob == pytest.approx(reference_summed_logprob(smollm2_reference, result.token_ids), abs=1e-3)


def test_one_fewer_scores_than_tokens_and_perplexity(smollm2):
    result = score(smollm2, ["The cat sat on the mat."])[0]
    assert len(result.token_logprobs) == len(result.tokens) - 1 == len(result.token_ids) - 1
    assert "".join(result.tokens) == "The cat sat on the mat."
    assert all(lp <= 0 for lp in result.token_logprobs)
    assert result.logprob == pytest.approx(sum(result.token_logprobs))
    assert result.perplexity == pytest.approx(math.exp(-result.logprob / len(result.token_logprobs)))
    with torch.inference_mode():  # the second token's score, by hand
        logits = smollm2.model(torch.tensor([result.token_ids[:1]]))[0, -1]
    assert result.token_logprobs[0] == pytest.approx(float(logits.log_softmax(-1)[result.token_ids[1]]), abs=1e-4)


def test_a_one_token_text_has_nothing_scored(smollm2):
    result = score(smollm2, ["Hello"])[0]
    assert len(result.tokens) == 1 and result.token_logprobs == [] and result.logprob == 0.0
    assert math.isnan(result.perplexity)


def test_batches_give_the_same_scores_as_one_text_at_a_time(smollm2):
    batched = score(smollm2, TEXTS, batch_tokens=4096)
    alone = score(smollm2, TEXTS, batch_tokens=1)  # every text in a pass of its own
    for together, single in zip(batched, alone):
        assert together.token_ids == single.token_ids
        assert together.token_logprobs == pytest.approx(single.token_logprobs, abs=1e-4)


def test_length_batches_group_similar_lengths_within_the_budget():
    lengths = [300, 5, 7, 290, 6, 1000]
    batches = length_batches(lengths, batch_tokens=600)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert batches == [[1, 4, 2], [3, 0], [5]]  # the 1000-token text goes alone
    for batch in batches[:-1]:
        assert len(batch) * max(lengths[i] for i in batch) <= 600


def test_every_family_scores_as_transformers(tiny):
    ids_text = "Hello world, this is a longer text to score." * 2  # within GPT-2's 128 positions
    result = score(tiny.llm, [ids_text, "short"])[0]
    assert result.logprob == pytest.approx(reference_summed_logprob(tiny.reference, result.token_ids), abs=1e-3)


def test_bad_texts_are_refused_before_any_work(smollm2):
    with pytest.raises(InvalidParameterError, match=r"texts must be a list of strings \(for one text: \[text\]\)"):
        score(smollm2, "one text")
    with pytest.raises(InvalidParameterError, match=r"texts\[1\] is empty"):
        score(smollm2, ["fine", ""])
    with pytest.raises(InvalidParameterError, match=r"texts\[0\] must be a string, not int"):
        score(smollm2, [3])
    with pytest.raises(InvalidParameterError, match=r"texts\[0\] has \d+ tokens; the model's context is 8192"):
        score(smollm2, ["word " * 9000])
    with pytest.raises(InvalidParameterError, match="batch_tokens must be a positive integer"):
        score(smollm2, ["fine"], batch_tokens=0)
    with pytest.raises(InvalidParameterError, match="batch_tokens must be a positive integer, not True"):
        score(smollm2, ["fine"], batch_tokens=True)


def test_a_score_shows_its_numbers(smollm2):
    result = score(smollm2, ["Paris is the capital of France."])[0]
    assert repr(result) == (
        f"ScoredText('Paris is the capital of France.', {len(result.tokens)} tokens, "
        f"logprob={result.logprob:.4f}, perplexity={result.perplexity:.4g})"
    )
