"""SAID alignment: item ID -> k soft tokens that make a frozen LLM reproduce the item text.

Input sequence per item (all segments but the text have a fixed length, so a batch is
right-padded text after a fixed prefix and positions need no shifting):

    [<|im_start|>] [soft_1 .. soft_k] [prompt tokens] [text tokens .. eos] [pad ..]

The loss is teacher-forced next-token cross-entropy on the text tokens and the closing eos
only (eos teaches the model where the text stops, which greedy reconstruction needs). The
LM head runs only at the positions that predict those tokens (and the batch's padding after
them, masked out: length-bucketed batches have little).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.llm import backbone

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per item (B,), accuracy (B,), mean ()


@dataclass
class AlignerConfig:
    n_items: int  # rows 1..n_items; row 0 is padding
    hidden: int  # LLM hidden size
    item_dim: int  # width of the ID embedding rows
    k: int  # soft tokens per item
    init_std: float = 1.0

    @property
    def vector_dim(self) -> int:
        """Width of the downstream item vector: all k soft tokens, concatenated."""
        return self.k * self.hidden


def item_vector(soft: torch.Tensor) -> torch.Tensor:
    """The downstream vector of items from their soft tokens: (B, k, H) -> (B, k*H).

    All k tokens are kept (concatenated): their mean would fold k different positions of
    the prompt into one and lose what the LLM reads from each."""
    return soft.flatten(1)


class Projector(nn.Module):
    """MLP from an item row (d) to k soft tokens in the LLM's space (k, H)."""

    def __init__(self, cfg: AlignerConfig) -> None:
        super().__init__()
        self.k, self.hidden = cfg.k, cfg.hidden
        self.net = nn.Sequential(
            nn.Linear(cfg.item_dim, 4 * cfg.item_dim),
            nn.GELU(),
            nn.Linear(4 * cfg.item_dim, cfg.k * cfg.hidden),
        )

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.net(rows).view(*rows.shape[:-1], self.k, self.hidden)  # (B, k, H)


class ItemAligner(nn.Module):
    """The trainable part of SAID: an item table and the projector. The LLM stays outside."""

    def __init__(self, cfg: AlignerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # sparse: the optimizer then touches only the rows in the batch (SparseAdam)
        self.items = nn.Embedding(cfg.n_items + 1, cfg.item_dim, padding_idx=0, sparse=True)
        nn.init.normal_(self.items.weight, std=cfg.init_std)
        with torch.no_grad():
            self.items.weight[0].zero_()
        self.projector = Projector(cfg)

    def soft_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return self.projector(self.items(idx))  # (B, k, H)

    @torch.no_grad()
    def item_vectors(self, batch_size: int = 4096) -> torch.Tensor:
        """Downstream vector of every item (``item_vector``): (N+1, k*H)."""
        rows = self.items.weight
        return torch.cat(
            [item_vector(self.projector(rows[s : s + batch_size])) for s in range(0, len(rows), batch_size)]
        )


@dataclass
class TextBatch:
    """Tokenized item texts, right-padded; ``ids`` end with eos."""

    ids: torch.Tensor  # (B, L) long
    mask: torch.Tensor  # (B, L) bool, True on real tokens

    def to(self, device: torch.device) -> TextBatch:
        return TextBatch(self.ids.to(device), self.mask.to(device))


def tokenize_texts(tok, texts: list[str], max_tokens: int = 64) -> list[list[int]]:
    """Token ids of each text plus eos, truncated to ``max_tokens`` in all."""
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return [t[: max_tokens - 1] + [tok.eos_token_id] for t in ids]


def pad_batch(token_lists: list[list[int]], pad_id: int) -> TextBatch:
    width = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.bool)
    for i, t in enumerate(token_lists):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = True
    return TextBatch(ids, mask)


class Prefix:
    """The fixed tokens around the soft tokens: a lead token and a short prompt."""

    def __init__(self, tok, prompt: str, lead: str = "<|im_start|>") -> None:
        lead_ids = tok(lead, add_special_tokens=False)["input_ids"] if lead else []
        self.lead = torch.tensor(lead_ids, dtype=torch.long)
        self.prompt = torch.tensor(tok(prompt, add_special_tokens=False)["input_ids"])

    def length(self, k: int) -> int:
        return len(self.lead) + k + len(self.prompt)


@dataclass(frozen=True)
class FrozenLM:
    """The LLM as an aligner reads it: the model, its tokenizer, the device and the fixed
    prefix always travel together, so they are one value. Frozen except while a full
    alignment trains LoRA adapters (``lora_rank``); fresh items never change it."""

    model: nn.Module
    tok: Any
    device: torch.device
    prefix: Prefix
    body: nn.Module | None = None  # a compiled view of the model's transformer (``compiled``)
    head_loss: Callable[..., Losses] | None = None  # a compiled ``text_loss`` (``compiled``)

    @classmethod
    def around(cls, model: nn.Module, tok: Any, device: torch.device, prompt: str) -> FrozenLM:
        """``model`` and ``tok`` on ``device``, read through ``prompt``."""
        return cls(model, tok, device, Prefix(tok, prompt=prompt))

    def with_prompt(self, prompt: str) -> FrozenLM:
        """The same LLM read through another prompt (an aligner bundle's own)."""
        return replace(self, prefix=Prefix(self.tok, prompt=prompt))

    def compiled(self) -> FrozenLM:
        """The same LLM whose training steps run its transformer and its head's loss
        (``text_loss``) through ``torch.compile`` (dynamic shapes: one graph serves every
        length bucket). The compiler fuses the elementwise work between the matmuls (norms,
        rotary, SiLU, the softmax over the vocabulary and its backward): more items a second
        after minutes of compiling, so for a catalogue alignment, not a demo's
        (``SAID_ALIGN_COMPILE``; figures in docs/speed.md). Weights are shared."""
        return replace(
            self,
            body=torch.compile(backbone(self.model), dynamic=True),
            head_loss=torch.compile(text_loss, dynamic=True),
        )

    @property
    def pad_id(self) -> int:
        """The padding token (SmolLM2: eos, as the tokenizer adds no pad of its own)."""
        return self.tok.pad_token_id

    @property
    def eos_id(self) -> int:
        """The token that ends a text; greedy reconstruction stops there."""
        return self.tok.eos_token_id

    @property
    def hidden(self) -> int:
        """The LLM's hidden size: the width of each soft token."""
        return self.model.config.hidden_size


def build_inputs(
    llm: nn.Module, prefix: Prefix, soft: torch.Tensor, text: TextBatch | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input embeddings and attention mask: (B, P+L, H), (B, P+L)."""
    emb = llm.get_input_embeddings()
    B, dev = soft.shape[0], soft.device
    lead = emb(prefix.lead.to(dev)).expand(B, -1, -1)  # (B, 1, H)
    prompt = emb(prefix.prompt.to(dev)).expand(B, -1, -1)  # (B, P', H)
    parts = [lead, soft.to(lead.dtype), prompt]
    mask = [torch.ones(B, prefix.length(soft.shape[1]), dtype=torch.long, device=dev)]
    if text is not None:
        parts.append(emb(text.ids))  # (B, L, H)
        mask.append(text.mask.long())
    return torch.cat(parts, 1), torch.cat(mask, 1)


def text_loss(weight: torch.Tensor, h_pred: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> Losses:
    """The LM head (its (V, H) weight, tied and bias-free in SmolLM2) and cross-entropy over
    the text positions: (B, L, H) hidden states that predict (B, L) token ids, padding
    masked out. Returns per-item mean CE (B,), per-item token accuracy (B,) and the mean
    CE over all text tokens of the batch ().

    Every position is scored, padding included, and masked afterwards: without a
    data-dependent selection the compiler fuses the head's softmax, its backward and the
    argmax into passes over bf16 logits, instead of materialising (N, V) fp32 logits three
    times (an eighth of a compiled step's time; docs/speed.md, stop 53)."""
    logits = F.linear(h_pred, weight).float()  # (B, L, V)
    tok_loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")  # (B*L,)
    tok_loss = tok_loss.view(ids.shape)  # (B, L)
    m = mask.float()
    correct = (logits.argmax(-1) == ids).float()  # (B, L)
    counts = m.sum(1).clamp(min=1)
    total = (tok_loss * m).sum(1)  # (B,)
    return total / counts, (correct * m).sum(1) / counts, total.sum() / m.sum()


def alignment_loss(lm: FrozenLM, soft: torch.Tensor, text: TextBatch) -> Losses:
    """Per-item mean CE over text tokens, per-item token accuracy, and the batch mean loss.

    Returns (loss_per_item (B,), acc_per_item (B,), mean_loss ()). The mean is over all
    text tokens of the batch, so long texts weigh by their length as in plain LM training.
    A compiled ``lm`` (``FrozenLM.compiled``) runs its compiled transformer and head.
    """
    inputs, attn = build_inputs(lm.model, lm.prefix, soft, text)
    body = backbone(lm.model) if lm.body is None else lm.body
    h = body(inputs_embeds=inputs, attention_mask=attn).last_hidden_state  # (B, T, H)
    P, L = lm.prefix.length(soft.shape[1]), text.ids.shape[1]
    h_pred = h[:, P - 1 : P - 1 + L]  # position t predicts text token t: (B, L, H)
    head_loss = text_loss if lm.head_loss is None else lm.head_loss
    return head_loss(lm.model.get_output_embeddings().weight, h_pred, text.ids, text.mask)


@torch.no_grad()
def decoded_text(tok, ids: list[int] | None) -> str | None:
    """The text of a greedy decoding (its eos dropped); None for an item not decoded."""
    return None if ids is None else tok.decode(ids, skip_special_tokens=True)


def greedy_reconstruct(
    llm: nn.Module, prefix: Prefix, soft: torch.Tensor, max_tokens: int, eos_id: int
) -> list[list[int]]:
    """Decode each item's text from its soft tokens alone; stops at eos. Token id lists.

    The key/value cache is a ``DynamicCache`` passed as ``cache=`` and grown in place by each
    forward: the ``past_key_values`` keyword and output field are deprecated (transformers 5.x
    removes them in 5.40)."""
    from transformers import DynamicCache

    inputs, attn = build_inputs(llm, prefix, soft, None)
    cache, B = DynamicCache(config=llm.config), soft.shape[0]
    out = llm(inputs_embeds=inputs, attention_mask=attn, cache=cache, use_cache=True)
    tokens = torch.empty(B, 0, dtype=torch.long, device=soft.device)
    done = torch.zeros(B, dtype=torch.bool, device=soft.device)
    nxt = out.logits[:, -1].argmax(-1)  # (B,)
    for _ in range(max_tokens):
        tokens = torch.cat([tokens, nxt.unsqueeze(1)], 1)
        done |= nxt == eos_id
        if done.all():
            break
        attn = torch.cat([attn, torch.ones(B, 1, dtype=attn.dtype, device=attn.device)], 1)
        out = llm(input_ids=nxt.unsqueeze(1), attention_mask=attn, cache=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
    result = []
    for row in tokens.tolist():
        result.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return result


class FreshRows(nn.Module):
    """New item rows trained against a frozen projector: old rows are never touched.

    The fresh rows live in their own parameter; the caller appends them to the table
    after training, so every old row and the projector stay bit-identical.
    """

    def __init__(self, projector: Projector, init_rows: torch.Tensor) -> None:
        super().__init__()
        self.projector = projector.requires_grad_(False)
        self.rows = nn.Parameter(init_rows.clone())  # (n_fresh, d)

    def soft_tokens(self, local_idx: torch.Tensor) -> torch.Tensor:
        return self.projector(self.rows[local_idx])  # (B, k, H)


def text_init_rows(features: torch.Tensor, item_dim: int, std: float = 1.0) -> torch.Tensor:
    """Starting rows from pooled text features: their top ``item_dim`` principal components,
    scaled to ``std``. Items with similar text start close, so the projector's first passes
    already see structure instead of noise. (N, H) -> (N, item_dim)."""
    x = (features - features.mean(0)).double()  # (N, H)
    _, vecs = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues: (H, H)
    q = min(item_dim, vecs.shape[1])
    rows = x @ vecs[:, -q:].flip(1)  # (N, q), strongest component first
    if q < item_dim:
        rows = torch.cat([rows, torch.zeros(len(rows), item_dim - q, dtype=rows.dtype)], 1)
    return (rows * (std / rows.std().clamp(min=1e-12))).float()


def fit_text_to_rows(features: torch.Tensor, rows: torch.Tensor, l2: float = 1.0) -> torch.Tensor:
    """Ridge regression W so that [features, 1] @ W ~ rows, in closed form.

    This is the fresh-item estimator: pooled LLM text features of already-aligned items
    predict their aligned rows; a new item gets ``[f, 1] @ W`` at once and refinement starts
    there. Closed form keeps it to one solve, refitted in milliseconds at each retrain.
    """
    x = torch.cat([features, torch.ones(len(features), 1)], 1).double()  # (N, H+1)
    reg = l2 * torch.eye(x.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0  # no penalty on the bias
    w = torch.linalg.solve(x.T @ x + reg, x.T @ rows.double())  # (H+1, d)
    return w.float()


def estimate_rows(features: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, torch.ones(len(features), 1)], 1) @ w  # (N, d)
