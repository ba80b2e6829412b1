"""The transformers backend of the Teacher: forward passes and `generate` on a loaded causal LM.

A backend works on token ids only; the Teacher above it owns text, chat templates, padding and checks.
Every sequence's result is aligned with its tokens: row t is the teacher's distribution over token t
given tokens < t, so row 0 (no context) is a placeholder that the Teacher masks out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Rows = tuple[
    np.ndarray, np.ndarray, np.ndarray
]  # topk_ids [L, k] int32, topk_logprobs [L, k], token_logprobs [L]


class HFBackend:
    """Scores and generates with a transformers model in eval mode, batch by batch, under no_grad."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = next(model.parameters()).device
        # padded heads: only the tokenizer's ids are real tokens (METHODS.md §4)
        self.vocab_size = min(len(tokenizer), model.config.vocab_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 1 << 30))

    def max_top_k(self) -> int:
        """The largest k this backend can return: the whole vocabulary."""
        return self.vocab_size

    def _pad(self, sequences: Sequence[Sequence[int]], left: bool) -> tuple[Any, Any]:
        import torch

        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        attn = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[i, span] = torch.as_tensor(seq, dtype=torch.long)
            attn[i, span] = 1
        return ids.to(self.device), attn.to(self.device)

    def logprobs(self, sequences: Sequence[Sequence[int]], k: int, temperature: float = 1.0) -> list[Rows]:
        """Top-k ids and log-probs (full-vocabulary log-softmax) and realized-token log-probs per sequence.

        The log-softmax and top-k run on the model's device in float32; only the (L, k) arrays move to
        the host, never the (L, V) logits.
        """
        import torch

        out: list[Rows] = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            ids, attn = self._pad(chunk, left=False)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=attn).logits[..., : self.vocab_size]
                logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
                top_lp, top_ids = logp.topk(k, dim=-1)
                tok_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            top_lp, top_ids, tok_lp = top_lp.cpu().numpy(), top_ids.cpu().numpy(), tok_lp.cpu().numpy()
            for i, seq in enumerate(chunk):
                n = len(seq)
                rows_ids = np.zeros((n, k), np.int32)
                rows_lp = np.zeros((n, k), np.float32)
                rows_tok = np.zeros((n,), np.float32)
                rows_ids[1:], rows_lp[1:], rows_tok[1:] = (
                    top_ids[i, : n - 1],
                    top_lp[i, : n - 1],
                    tok_lp[i, : n - 1],
                )
                out.append((rows_ids, rows_lp, rows_tok))
        return out

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[list[list[int]]]:
        """n continuations (token ids, EOS kept, padding dropped) per prompt; temperature 0 is greedy."""
        import torch

        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        results: list[list[list[int]]] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                ids, attn = self._pad(chunk, left=True)  # left padding: generation appends on the right
                sample = temperature > 0
                with torch.no_grad():
                    gen = self.model.generate(
                        input_ids=ids,
                        attention_mask=attn,
                        do_sample=sample,
                        temperature=temperature if sample else None,
                        top_p=top_p if sample else None,
                        top_k=None,
                        max_new_tokens=max_new_tokens,
                        num_return_sequences=n,
                        pad_token_id=pad,
                        eos_token_id=eos,
                    )
                new = gen[:, ids.shape[1] :].cpu().tolist()
                for i in range(len(chunk)):
                    results.append([_cut(seq, eos) for seq in new[i * n : (i + 1) * n]])
        return results


def _cut(tokens: list[int], eos: int | None) -> list[int]:
    """Tokens up to and including the first EOS (what follows is padding)."""
    if eos is not None and eos in tokens:
        return tokens[: tokens.index(eos) + 1]
    return tokens
