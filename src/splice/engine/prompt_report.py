"""`Model.test_prompt`: the answer's rank and the top-k alternatives, as a table."""

from __future__ import annotations

import torch


def prompt_report(model, prompt: str, answer: str, top_k: int, edits, print_results: bool):
    import pandas as pd

    prompt_ids = model.to_tokens(prompt)
    answer_ids = model.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"].to(
        prompt_ids.device
    )
    ids = torch.cat([prompt_ids, answer_ids], dim=1)
    with torch.no_grad():
        logits, _ = model.run(ids, edits=edits)
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
