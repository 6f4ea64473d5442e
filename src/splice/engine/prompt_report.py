"""`Model.test_prompt`: the answer's rank and the top-k alternatives, as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pandas as pd


def prompt_report(
    model: Any,
    prompt: str,
    answer: str,
    top_k: int,
    edits: Any,
    print_results: bool,  # a splice.Model
) -> pd.DataFrame | None:
    """How a model (under optional edits) ranks each token of an answer after a prompt.

    The work behind `Model.test_prompt`: one forward over prompt + answer, then for each answer
    token its rank, logit and probability and the `top_k` alternatives.

    Args:
        model: The model, with a tokenizer.
        prompt: The prompt text.
        answer: The answer text (tokenized without special tokens, e.g. `" Paris"`).
        top_k: How many alternatives to list per answer token (at least 1).
        edits: Edits applied to the forward (`Edits`, a dict or None).
        print_results: Print the report (and return None) instead of returning the table.

    Returns:
        None when printing; otherwise a DataFrame with one row per (answer token, rank):
        `answer_token, rank, token, logit, prob, is_answer`, plus a row for the answer itself
        when it is not among the top k.
    """
    import pandas as pd

    prompt_ids = model.to_tokens(prompt)
    answer_ids = model.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"].to(
        prompt_ids.device
    )
    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    with torch.no_grad():
        logits, _ = model.run(ids, edits=edits)
    assert logits is not None  # None only with stop_after_record
    start = prompt_ids.shape[1] - 1
    rows, lines = (
        [],
        [f"Prompt: {model.to_str_tokens(prompt_ids[0])}", f"Answer: {model.to_str_tokens(answer_ids[0])}"],
    )
    for step, target in enumerate(answer_ids[0].tolist()):
        step_logits = logits[0, start + step].float()
        probs = step_logits.softmax(-1)
        rank = int((step_logits > step_logits[target]).sum())
        target_str = model.tokenizer.decode([target])
        lines.append(
            f"Performance on answer token {target_str!r}: rank {rank}, logit {step_logits[target]:.2f}, prob {probs[target]:.2%}"
        )
        top = step_logits.topk(top_k)
        for r, (value, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            token = model.tokenizer.decode([index])
            rows.append(
                {
                    "answer_token": target_str,
                    "rank": r,
                    "token": token,
                    "logit": value,
                    "prob": float(probs[index]),
                    "is_answer": index == target,
                }
            )
            lines.append(f"  {r:>3}: logit {value:6.2f}  prob {float(probs[index]):6.2%}  {token!r}")
        if rank >= top_k:  # the answer is not among the top k: its own row, after them
            rows.append(
                {
                    "answer_token": target_str,
                    "rank": rank,
                    "token": target_str,
                    "logit": float(step_logits[target]),
                    "prob": float(probs[target]),
                    "is_answer": True,
                }
            )
    if print_results:
        print("\n".join(lines))
        return None  # printed: returning the table too would show it twice in a notebook
    return pd.DataFrame(rows)
