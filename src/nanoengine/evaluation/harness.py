"""lm-evaluation-harness's model `nanoengine`: a loaded model evaluated in-process, no server.

    nanoengine eval --model_args pretrained=smollm2-135m-instruct --tasks hellaswag

or from Python, once this module is imported (importing it registers the name with lm-eval):

    import lm_eval, nanoengine.evaluation.harness
    lm_eval.simple_evaluate(model="nanoengine", model_args="pretrained=FOLDER", tasks=[...])

`pretrained` is a registered name or a checkpoint folder. The three request types run as:
- `loglikelihood` (multiple choice: HellaSwag, ARC, ...): each context + continuation scored in
  batched passes (`research.prompt_logprobs`, grouped by length), with the likeliest token at each
  position for lm-eval's `is_greedy`;
- `loglikelihood_rolling` (perplexity): lm-eval's own rolling windows, scored the same way;
- `generate_until`: `llm.generate`, every prompt of a group submitted at once so that the engine
  batches them, with `until` as stop strings and greedy decoding unless the task asks otherwise.
Requires the `eval` extra (`pip install 'nanoengine[eval]'`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry fills itself only while empty)
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..api.llm import load
from ..api.models import configure
from ..errors import InvalidParameterError
from ..research.prompt_logprobs import score_token_lists
from ..research.scoring import DEFAULT_BATCH_TOKENS
from ..weights.registry import DEFAULT_MODEL

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
# gen_kwargs of lm-eval tasks, and the `llm.generate` parameter each becomes.
GENERATION_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed"}


@register_model("nanoengine")
class NanoEngineLM(TemplateLM):
    """An lm-eval model over `nanoengine.load(pretrained)`.

    `dtype` and `device` are nanoengine's (`nanoengine.configure`); `max_length` bounds a scored
    context plus continuation (default: the model's context, as lm-eval's `hf` has it; a generation's
    prompt plus new tokens are bounded by the engine's longest sequence too); `batch_tokens` bounds
    the padded tokens of one scoring pass (one longer sequence goes alone). lm-eval's `batch_size` and `max_batch_size` are accepted and unused: scoring
    passes are sized by tokens, and generation is batched by the engine.
    """

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        dtype: str | None = None,
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        batch_size: Any = None,
        max_batch_size: Any = None,
    ) -> None:
        super().__init__()
        device = device_for(device)
        if dtype is not None or device is not None:
            configure(dtype=dtype, device=device)
        self.llm = load(pretrained)
        self.pretrained = str(pretrained)
        context = self.llm.model.config.max_position_embeddings
        self.max_length = int(max_length) if max_length is not None else context
        if not 2 <= self.max_length <= context:
            raise InvalidParameterError(f"max_length must be in [2, the model's context], not {max_length!r}")
        self.max_gen_toks = int(max_gen_toks)
        self.batch_tokens = int(batch_tokens)

    @property
    def eot_token_id(self) -> int:
        return self.llm.model.config.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes: the BOS token, else the end-of-sequence one (as lm-eval's `hf` does)."""
        bos = self.llm.model.config.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as the checkpoint's tokenizer gives them by default (a BOS only where it adds
        one, and not before a text that already starts with it), as lm-eval's `hf` does."""
        if add_special_tokens is None:
            add_special_tokens = not string.startswith(self.tok_decode([self.prefix_token_id]))
        return self.llm.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llm.tokenizer.decode(tokens, skip_special_tokens=False)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Per (cache key, context ids, continuation ids): the continuation's log-probability and
        whether greedy decoding gives it. A sequence longer than `max_length` loses its context's start."""
        sequences = [(context + continuation)[-self.max_length :] for _, context, continuation in requests]
        for (_, context, continuation), ids in zip(requests, sequences):
            if not continuation or len(continuation) >= len(ids):
                raise InvalidParameterError(
                    f"a log-likelihood request needs a continuation and at least one context token "
                    f"({len(context)} context and {len(continuation)} continuation tokens, max_length {self.max_length})"
                )
        scores = score_token_lists(self.llm.model, sequences, top_n=1, batch_tokens=self.batch_tokens)
        results = []
        for (key, _, continuation), scored in zip(requests, scores):
            start = len(scored.token_ids) - len(continuation)
            answer = (sum(scored.token_logprobs[start - 1 :]), scored.greedy(start))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
            results.append(answer)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text's log-probability, every token predicted once, in windows of `max_length` (lm-eval's)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            for context, continuation in map(lm_eval_utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, up to the first of its `until` strings (cut off) or the
        end-of-sequence token or `max_gen_toks`; requests with the same settings are submitted together."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        results: list[str] = [""] * len(requests)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            max_new_tokens = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            sampling = generation_settings(gen_kwargs)
            prompts = [self.fitted_prompt(requests[i].args[0], max_new_tokens) for i in indices]
            outputs = self.llm.generate(prompts, max_new_tokens=max_new_tokens, **sampling)
            for index, output in zip(indices, outputs):
                results[index] = output.text
                self.cache_hook.add_partial("generate_until", requests[index].args, output.text)
        return results

    def fitted_prompt(self, context: str, max_new_tokens: int) -> str:
        """The context, its start cut off (as lm-eval's `hf` does) where it leaves too little room."""
        ids = self.tok_encode(context)
        longest = min(self.max_length, self.llm.engine.max_seq_len)
        room = longest - max_new_tokens
        if len(ids) <= room:
            return context
        if room < 1:
            raise InvalidParameterError(f"max_gen_toks ({max_new_tokens}) leaves no room for a prompt within {longest} tokens")
        logger.warning("a context of %d tokens is cut to its last %d", len(ids), room)
        return self.tok_decode(ids[-room:])


def device_for(device: str | None) -> str | None:
    """nanoengine's device for lm-eval's `device`. lm-eval's command line sends `cuda:0` unless told
    otherwise: without CUDA, that falls back to nanoengine's default, as lm-eval's `hf` falls back."""
    if device is None or not device.startswith("cuda"):
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    logger.warning("lm-eval asks for device %r, but torch sees no CUDA device: running on nanoengine's default", device)
    return None


def generation_settings(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`llm.generate`'s parameters for a task's gen_kwargs (without max_gen_toks): greedy unless
    `do_sample` (or a temperature) says otherwise; `until` becomes the stop strings (the
    end-of-sequence token ends generation anyway)."""
    until = gen_kwargs.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    do_sample = gen_kwargs.pop("do_sample", None)
    sampling: dict[str, Any] = {"stop_sequences": [s for s in until if s] or None, "temperature": 0.0}
    for name, value in gen_kwargs.items():
        if name not in GENERATION_KWARGS:
            raise InvalidParameterError(f"gen_kwargs {name!r} is not supported; supported: until, max_gen_toks, do_sample, "
                                        f"{', '.join(GENERATION_KWARGS)}")  # fmt: skip
        sampling[GENERATION_KWARGS[name]] = value
    if do_sample is False:
        sampling["temperature"] = 0.0
    elif do_sample and "temperature" not in gen_kwargs:
        sampling["temperature"] = 1.0  # sampling from the model's own distribution, as transformers' default
    return sampling
