"""Choosing each row's next token from its logits: greedy (argmax, as generate does) or sampled with
the request's temperature, top_k, top_p and its own seeded generator, so a seed reproduces an
answer whatever else shares the batch."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

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


def choose(logits: torch.Tensor, requests: Sequence[Request], generators: Sequence[Optional[torch.Generator]]
           ) -> Tuple[List[int], List[Optional[float]], List[Optional[TopLogprobs]]]:
    """Next token of each row of `logits` [rows, vocab], its log-probability under the model and the
    request's top_logprobs most likely tokens (None where the request did not ask for them)."""
    greedy = [i for i, r in enumerate(requests) if r.greedy]
    tokens: List[int] = [0] * len(requests)
    if greedy:
        picked = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(requests) else logits.argmax(dim=-1).tolist()
        for i, t in zip(greedy, picked):
            tokens[i] = t
    for i, r in enumerate(requests):
        if not r.greedy:
            probs = filtered_probs(logits[i], r.temperature, r.top_k, r.top_p)
            tokens[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
    logprobs: List[Optional[float]] = [None] * len(requests)
    tops: List[Optional[TopLogprobs]] = [None] * len(requests)
    wanted = [i for i, r in enumerate(requests) if r.logprobs]
    if wanted:
        rows = torch.log_softmax(logits[wanted].float(), dim=-1)
        chosen = rows[torch.arange(len(wanted), device=rows.device), torch.tensor([tokens[i] for i in wanted],
                                                                                   device=rows.device)].tolist()
        for i, lp in zip(wanted, chosen):
            logprobs[i] = lp
        most = max(requests[i].top_logprobs for i in wanted)
        if most:  # one topk for the rows that asked, each keeping its own count
            values, ids = torch.topk(rows, min(most, rows.shape[-1]), dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for j, i in enumerate(wanted):
                k = requests[i].top_logprobs
                if k:
                    tops[i] = list(zip(ids[j][:k], values[j][:k]))
    return tokens, logprobs, tops


__all__ = ["TopLogprobs", "choose", "filtered_probs", "new_generator"]
