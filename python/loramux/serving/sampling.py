"""Choosing each row's next token from its logits: greedy (argmax, as generate does) or sampled with
the request's temperature, top_k, top_p and its own seeded generator, so a seed reproduces an
answer whatever else shares the batch."""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from loramux.errors import LoraNonFiniteError
from loramux.serving.request import Request


def new_generator(request: Request, device: torch.device) -> Optional[torch.Generator]:
    """The request's own random stream (None for greedy); unseeded requests draw a fresh seed."""
    if request.greedy:
        return None
    gen = torch.Generator(device=device)
    if request.seed is not None:
        gen.manual_seed(request.seed)
    else:
        gen.seed()
    return gen


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Probabilities of one row after temperature, top-k (keep the k most likely) and top-p (keep
    the smallest set of most likely tokens whose mass reaches p; the most likely token always
    stays), as in HF's TopK / TopP logits warpers."""
    scores = logits.float() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cum = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_scores, dim=-1) >= top_p  # mass before this token already reaches p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.softmax(scores, dim=-1)


#: (token id, log-probability) pairs of one step, most likely first
TopLogprobs = List[Tuple[int, float]]


class Choices(NamedTuple):
    """One step's picks for its rows: the token, its log-probability and the top_logprobs pairs
    (None where the request did not ask for them), or why the row has no token (`faults`: "logits"
    or "probabilities", those of the row NaN or infinite; the row's other fields are unset)."""

    tokens: List[int]
    logprobs: List[Optional[float]]
    tops: List[Optional[TopLogprobs]]
    faults: List[Optional[str]]


def non_finite_error(request: Request, fault: str) -> LoraNonFiniteError:
    """The error of a request whose "logits" or sampling "probabilities" came out NaN or infinite."""
    task_id = request.lora.task_id if request.lora is not None else None
    if fault == "probabilities":
        why = f"sampling probabilities not finite: its logits are too large for temperature {request.temperature}"
    elif task_id is not None:
        why = f"logits not finite (NaN or infinity): the weights of task_id {task_id} overflow the model's dtype"
    else:
        why = "logits not finite (NaN or infinity) without an adapter: the model overflows its dtype"
    return LoraNonFiniteError(why, task_id=task_id)


def _draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> Tuple[int, bool]:
    """One multinomial draw, and whether `probs` were usable. Unusable ones (NaN or infinite) are
    swapped on the device for uniform weights before the draw: on CUDA a draw from NaN is a
    device-side assert that ends the process; the result and the check come back in one copy."""
    usable = torch.isfinite(probs).all()
    draw = torch.multinomial(torch.where(usable, probs, torch.ones_like(probs)), 1, generator=generator)
    token, ok = torch.stack([draw[0], usable.long()]).tolist()
    return int(token), bool(ok)


def choose(logits: torch.Tensor, requests: Sequence[Request], generators: Sequence[Optional[torch.Generator]]
           ) -> Choices:
    """Next token of each row of `logits` [rows, vocab], its log-probability under the model and the
    request's top_logprobs most likely tokens. A row whose logits are not all finite (an adapter
    whose weights overflow the model's dtype) gets a fault instead, and the sampler never sees it:
    softmax or multinomial over it would fail, or garble, every row of the step."""
    rows = len(requests)
    # one copy brings every row's argmax (the greedy rows' tokens) and, as -1, the rows not finite
    finite = torch.isfinite(logits).all(dim=-1)
    codes = torch.where(finite, logits.argmax(dim=-1), -1).tolist()
    tokens = [max(c, 0) for c in codes]
    faults: List[Optional[str]] = ["logits" if c < 0 else None for c in codes]
    for i, r in enumerate(requests):
        if not r.greedy and faults[i] is None:
            probs = filtered_probs(logits[i], r.temperature, r.top_k, r.top_p)
            tokens[i], ok = _draw(probs, generators[i])
            if not ok:
                faults[i] = "probabilities"
    logprobs: List[Optional[float]] = [None] * rows
    tops: List[Optional[TopLogprobs]] = [None] * rows
    wanted = [i for i, r in enumerate(requests) if r.logprobs and faults[i] is None]
    if wanted:
        scores = torch.log_softmax(logits[wanted].float(), dim=-1)
        chosen = scores[torch.arange(len(wanted), device=scores.device),
                        torch.tensor([tokens[i] for i in wanted], device=scores.device)].tolist()
        for i, lp in zip(wanted, chosen):
            logprobs[i] = lp
        most = max(requests[i].top_logprobs for i in wanted)
        if most:  # one topk for the rows that asked, each keeping its own count
            values, ids = torch.topk(scores, min(most, scores.shape[-1]), dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for j, i in enumerate(wanted):
                k = requests[i].top_logprobs
                if k:
                    tops[i] = list(zip(ids[j][:k], values[j][:k]))
    return Choices(tokens, logprobs, tops, faults)


__all__ = ["Choices", "TopLogprobs", "choose", "filtered_probs", "new_generator", "non_finite_error"]
