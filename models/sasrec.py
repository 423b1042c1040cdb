"""SASRec scorer (Kang & McAuley 2018) with full-softmax cross-entropy.

Follows pmixer/SASRec.pytorch: ``log2feats`` encodes a history, ``forward`` gives the
training loss, ``predict`` scores every item. Item vectors come either from a learned ID
table (``id`` variant) or from a frozen table (``text``/``said``) through a small adapter
``Linear(D, D/2) -> Linear(D/2, hidden)`` (as in the LLMEmb code). Scores are dot products
with item vectors, so FAISS inner-product search can retrieve for it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.files import CorruptFile, load_torch, save_torch
from models.ranking import masked_scores


@dataclass
class SASRecConfig:
    n_items: int  # items are 1..n_items, 0 is padding
    hidden: int = 64  # width of item and sequence vectors
    max_len: int = 50  # longest history used
    layers: int = 2  # transformer blocks
    heads: int = 1  # attention heads
    dropout: float = 0.3  # dropout everywhere
    max_input: int = 576  # a wider frozen table enters through its top principal axes
    whiten: bool = False  # frozen-table input PCA-whitened (unit variance per axis), not only standardised
    residual_dropout: float = 0.0  # hybrid: chance an item's ID residual is zeroed in a training step
    residual_impute_k: int = 0  # hybrid: an item with no learned residual takes its k nearest items' mean


class SASRec(nn.Module):
    def __init__(
        self,
        cfg: SASRecConfig,
        frozen_table: torch.Tensor | None = None,
        standardise_on: torch.Tensor | None = None,
        residual_on: torch.Tensor | None = None,
    ) -> None:
        """``standardise_on``: the item ids whose rows fit the feature standardisation (the
        warm items of a cold-start split: held-out rows must not shape it); default all.

        ``residual_on`` (with a frozen table) makes the hybrid: each of these item ids also
        gets a learned ID row, zero-initialised and added to its adapted vector, so warm
        items keep what ID rows learn. Every other item's residual is fixed at zero (no
        gradient reaches it, not even as a negative), so cold items keep what the text gives.
        """
        super().__init__()
        self.cfg = cfg
        self.residual = None  # the hybrid's learned ID rows (below)
        if frozen_table is None:
            self.id_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)
            # std 1/sqrt(hidden): scores (LayerNormed features . item vector) start near unit
            # scale; nn.Embedding's N(0, 1) made the initial logits ~±60 and training stall.
            nn.init.normal_(self.id_emb.weight, std=cfg.hidden**-0.5)
            with torch.no_grad():
                self.id_emb.weight[0].zero_()
            self.register_buffer("table", None)
        else:
            if frozen_table.shape[0] != cfg.n_items + 1:
                raise ValueError(
                    f"table has {frozen_table.shape[0]} rows; expected n_items + 1 "
                    f"= {cfg.n_items + 1} (row 0 is padding)"
                )
            table = frozen_table.float()
            # not saved with the weights: serving maps new items' vectors with ``adapt``
            self.register_buffer("table", table.clone(), persistent=False)  # (N+1, D)
            # a fixed per-dimension standardisation (saved, never trained) puts LLM-scale
            # features on the scale the adapter's init expects; a warm start keeps it
            fit = table[1:] if standardise_on is None else table[standardise_on]
            self.register_buffer("feat_mean", fit.mean(0))
            self.register_buffer("feat_std", fit.std(0).clamp(min=1e-6))
            # A fixed projection on the top principal axes (fitted like the standardisation)
            # keeps the adapter's cost that of a 576-d table: with k=4 SAID vectors (2,304-d)
            # the full-width adapter made an epoch 10x slower than the ID scorer's on CPU.
            d = min(table.shape[1], cfg.max_input)
            axes = None
            if d < table.shape[1] or cfg.whiten:
                axes = principal_axes((fit - self.feat_mean) / self.feat_std, d, cfg.whiten)
            self.register_buffer("axes", axes)  # (D, d) or None
            # the table's adapter input, computed once (table, scaling and axes are fixed)
            self.register_buffer("table_in", self._adapter_input(table), persistent=False)  # (N+1, d)
            self.adapter = nn.Sequential(
                nn.Linear(d, d // 2), nn.Dropout(cfg.dropout), nn.Linear(d // 2, cfg.hidden)
            )
            if residual_on is not None:
                self.residual = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)
                nn.init.zeros_(self.residual.weight)
                seen = torch.zeros(cfg.n_items + 1, 1)
                seen[residual_on] = 1.0
                seen[0] = 0.0
                self.register_buffer("residual_seen", seen)  # (N+1, 1)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden,
            cfg.heads,
            cfg.hidden,
            cfg.dropout,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module``'s, then recompute the cached adapter input from the loaded
        standardisation and axes (a warm start or a saved scorer brings its own)."""
        result = super().load_state_dict(state_dict, strict, assign)
        if self.table is not None:
            self.table_in = self._adapter_input(self.table)
        return result

    def item_vectors(self, idx: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of ``idx`` (any shape) or of all items (N+1, hidden); ``keep`` (N+1, 1)
        scales the hybrid's residuals (``residual_keep``)."""
        if self.table is None:
            return self.id_emb.weight if idx is None else self.id_emb(idx)
        vectors = self.adapter(self.table_in if idx is None else self.table_in[idx])
        if self.residual is None:
            return vectors
        seen = self.residual_seen if keep is None else self.residual_seen * keep  # (N+1, 1)
        if idx is None:
            return vectors + self.residual.weight * seen
        return vectors + self.residual(idx) * seen[idx]

    def residual_keep(self) -> torch.Tensor | None:
        """(N+1, 1) 0/1 per item for one training step, or None: the hybrid's residual dropout.

        As DropoutNet (Volkovs et al., NeurIPS 2017) drops preference inputs so that a model
        also scores items that have none: an item whose residual is dropped is scored as a
        cold item is, from the adapted frozen vector alone, so the adapter cannot lean on
        the residuals and cold items compete on the same scale as warm ones. One draw per
        step, shared by the history and the candidates, as an item is either cold or not.
        """
        if not (self.training and self.residual is not None and self.cfg.residual_dropout):
            return None
        return (torch.rand_like(self.residual_seen) >= self.cfg.residual_dropout).float()

    @torch.no_grad()
    def impute_residuals(self) -> None:
        """After training: give each item that learned no residual (a cold item) the mean
        residual of its ``residual_impute_k`` nearest trained items, by cosine of their
        frozen vectors. Warm items' residuals carry collaborative signal (popularity, taste
        clusters) that a cold item otherwise lacks when it competes with them; its text
        neighbours' is the best guess, as in neighbour-based warm-up of cold ID embeddings
        (e.g. Zhu et al., SIGIR 2021). No-op unless the option is set."""
        k = self.cfg.residual_impute_k
        if self.residual is None or not k:
            return
        seen = self.residual_seen[:, 0] > 0  # (N+1,)
        cold = ~seen
        cold[0] = False  # padding stays zero
        if not cold.any() or not seen.any():
            return
        z = F.normalize(self.table_in, dim=1)  # (N+1, d)
        near = (z[cold] @ z[seen].T).topk(min(k, int(seen.sum())), dim=1).indices  # (C, k)
        self.residual.weight[cold] = self.residual.weight[seen][near].mean(1)  # (C, h)
        self.residual_seen[cold] = 1.0

    def adapt(self, rows: torch.Tensor) -> torch.Tensor:
        """(..., D) frozen-table rows (also of items added after training) -> (..., hidden)."""
        return self.adapter(self._adapter_input(rows))

    def content_vectors(self, content: torch.Tensor) -> torch.Tensor:
        """``Recommender``: a fresh item's vector from its frozen-table row alone."""
        return self.adapt(content)

    def query(self, history: torch.Tensor) -> torch.Tensor:
        """``Recommender``: (B, T, hidden) item vectors, no padding -> (B, hidden)."""
        history = history[:, -self.cfg.max_len :]  # the positions it has
        valid = torch.ones(history.shape[:2], dtype=torch.bool, device=history.device)
        return self.encode(history, valid)[:, -1]

    def _adapter_input(self, rows: torch.Tensor) -> torch.Tensor:
        z = (rows - self.feat_mean) / self.feat_std  # (..., D)
        return z if self.axes is None else z @ self.axes  # (..., d)

    def log2feats(self, seqs: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) left-padded item ids -> (B, T, hidden) causal sequence features."""
        return self.encode(self.item_vectors(seqs, keep), seqs > 0)

    def encode(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden) item vectors, left-padded, and (B, T) bool of real steps ->
        (B, T, hidden).

        One encoding for training (batches trimmed to their longest history), offline
        evaluation (padded to ``max_len``) and serving (no padding): positions count back
        from the newest step, which is always position ``max_len - 1``, and padding is
        masked as attention keys, so padding changes nothing a real step computes.
        """
        B, T = valid.shape
        pos = torch.arange(self.cfg.max_len - T, self.cfg.max_len, device=x.device)  # (T,)
        x = x * self.cfg.hidden**0.5 + self.pos_emb(pos)
        x = self.drop(x) * valid.unsqueeze(-1)
        blocked = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)  # (T, T) causal
        blocked = blocked | ~valid[:, None, :]  # (B, T, T): no query reads a padding key ...
        blocked &= ~torch.eye(T, dtype=torch.bool, device=x.device)  # ... but each reads itself
        mask = torch.zeros(blocked.shape, device=x.device).masked_fill(blocked, float("-inf"))
        x = self.blocks(x, mask=mask.repeat_interleave(self.cfg.heads, 0))  # (B*heads, T, T)
        return self.norm(x) * valid.unsqueeze(-1)

    def forward(
        self, seqs: torch.Tensor, targets: torch.Tensor, blocked: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean full-softmax cross-entropy of next-item prediction over non-padding steps.

        ``blocked``: item ids left out of the softmax (-inf), e.g. the held-out items of a
        cold-start split, which must not be pushed down as negatives before they exist."""
        keep = self.residual_keep()  # (N+1, 1) or None
        feats = self.log2feats(seqs, keep)  # (B, T, h)
        sel = targets > 0
        logits = feats[sel] @ self.item_vectors(keep=keep).T  # (N_sel, N+1), only where needed
        logits[:, 0] = float("-inf")
        if blocked is not None:
            logits[:, blocked] = float("-inf")
        return F.cross_entropy(logits, targets[sel])

    def user_vector(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.log2feats(seqs)[:, -1]  # (B, h): the last position sees the whole history

    def predict(self, seqs: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of every item for each history: (B, N+1); padding and ``blocked`` score -inf."""
        return masked_scores(self.user_vector(seqs), self.item_vectors(), blocked)


def principal_axes(z: torch.Tensor, d: int, whiten: bool = False) -> torch.Tensor:
    """(D, d) top principal axes of the rows of ``z`` (already centred). With fewer rows
    than ``d`` the axes beyond their rank are zero columns (inputs the adapter ignores).

    ``whiten`` divides each axis by its standard deviation, so projected rows have unit
    variance on every axis: WhitenRec (Zhang et al., 2024) found whitened text embeddings
    far better inputs to a sequential recommender than raw ones, whose variance sits in a
    few directions (anisotropy)."""
    _, sv, vh = torch.linalg.svd(z, full_matrices=False)  # (min(N, D),), (min(N, D), D)
    axes = torch.zeros(z.shape[1], d)
    k = min(d, vh.shape[0])
    axes[:, :k] = vh[:k].T
    if whiten:
        # axes past the rows' numerical rank carry only rounding noise: dropped, not scaled up
        rank = int((sv[:k] > sv[0] * max(z.shape) * torch.finfo(z.dtype).eps).sum())
        axes[:, rank:] = 0.0
        std = sv[:rank] / max(z.shape[0] - 1, 1) ** 0.5  # (rank,) spread of the rows along each axis
        axes[:, :rank] /= std
    return axes


@torch.no_grad()
def init_id_rows(model: SASRec, table: torch.Tensor, fit_on: torch.Tensor | None = None) -> None:
    """Start an ID scorer's item rows from a frozen table's top ``hidden`` principal axes.

    LLM-ESR (Liu et al., NeurIPS 2024) and LLMInit initialise ID embeddings from reduced
    LLM embeddings and train them as usual: warm rows keep all the freedom of ID rows but
    start where the text puts them. The axes are fitted on ``fit_on`` rows (warm items);
    the rows are scaled to the ID table's own initial spread, row 0 (padding) stays zero.
    """
    fit = slice(1, None) if fit_on is None else fit_on
    rows = table[fit]
    mean, std = rows.mean(0), rows.std(0).clamp(min=1e-6)
    init = ((table - mean) / std) @ principal_axes((rows - mean) / std, model.cfg.hidden)  # (N+1, h)
    init *= model.cfg.hidden**-0.5 / init[fit].std()
    init[0] = 0.0
    model.id_emb.weight.copy_(init)


def save_scorer(path: Path, model: SASRec, meta: dict) -> Path:
    """Weights (not the table: serving maps items with the adapter) plus metadata, atomically."""
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_torch(
        {"config": asdict(model.cfg), "frozen_dim": model.feat_mean.shape[0], "state": state, "meta": meta},
        path,
    )
    return path


def load_sasrec(path: Path, table: torch.Tensor | None = None) -> tuple[SASRec, dict]:
    """A saved scorer; with ``table`` (N+1, D) it can also score by item index (training).

    Without a table, a small placeholder satisfies the constructor; the saved
    standardisation overwrites the placeholder's, and ``adapt`` maps any item's vector.
    """
    saved = load_torch(path)
    try:
        # scorers saved before the principal-axes input had full-width adapters
        cfg = SASRecConfig(**({"max_input": saved["frozen_dim"]} | saved["config"]))
        if table is None:
            cfg, table = replace(cfg, n_items=2), torch.zeros(3, saved["frozen_dim"])
        else:
            cfg = replace(cfg, n_items=table.shape[0] - 1)
        model = SASRec(cfg, table)
        model.load_state_dict(saved["state"])
        return model, saved["meta"]
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:  # a whole file of another kind
        raise CorruptFile(f"{path}: not a scorer file ({type(exc).__name__}: {exc})") from exc
