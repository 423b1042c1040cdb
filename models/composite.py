"""The warm/cold composite: a trained ID SASRec (the teacher) for items with interactions,
a content tower (the student) for items without, in one vector space and one ranking.

ID rows are what makes a sequential scorer strong on items it has seen, and useless on items
it has not (their rows never trained). The student maps an item's content vector (its SAID
soft tokens, or pooled text) to a vector in the teacher's item space; it is trained on warm
items to score as the teacher does (``training/composite.py``), as ALDI (Huang et al.,
SIGIR 2023) distils warm ID embeddings into a cold-item generator. Each item's vector is

    v_i = g_i * e_i + (1 - g_i) * s(c_i),     g_i = n_i / (n_i + kappa)

with ``e_i`` the teacher's ID row, ``s(c_i)`` the student's vector and ``n_i`` the item's
interactions in the teacher's training data (``kappa`` 0: a hard switch at one
interaction). Queries run the teacher's encoder over each history; what it reads there is
below (History reads).

Content similarity (``similarity`` gamma): on a beauty-2k draw the plain text scorer found
cold targets 16x better than the composite, half of its hits one brand's held-out line
bought after the same brand's items. Pooled text carries the brand; the student, mapping
text into the ID teacher's space, loses it. So an item without interactions also scores
``gamma * o_i * <m_u, z_i>``: ``z_i`` its content row's top ``similarity_dims``
principal axes, unit length, and ``m_u`` the recency-weighted mean of the ``z`` of the
user's history (weight ``recency`` ** age, the newest item 1). With a negative boost this is
a threshold on content similarity to what the user just took: a cold item enters a list
where it resembles the history, not everywhere. gamma is chosen on validation with the
gate and the boost; 0 turns it off.

Calibration: a student's scores need not sit on the warm items' scale. Regressing towards
the mean of the ID rows, they can sit below it (new items buried) or, on a small catalogue,
above it (new items flooding warm users' lists: the demo's 200 items). ``boost`` adds
``o_i * boost`` to an item's score, either sign, picked on validation with ``kappa``.
It is carried as one more dimension (item: ``o_i * boost``, query: 1), so every
score stays one inner product (FAISS). The similarity adds one block of ``r`` =
``similarity_dims``: ``(o_i + (1 - o_i) * WARM_Z_SCALE) z_i``, which the query meets with
``gamma * m_u``. A history's ``z`` is each step's block made unit length again, so a query
is computed from scoring vectors alone, as served. Scoring vectors are ``hidden + 1 + r``
wide: [gated vector (h) | boost (1) | z (r)], and ``cfg.hidden`` says so.

Cold terms (``o_i``): the boost and the similarity are for items without interactions
(``o_i`` 1, else 0), whatever the gate. The gate mixes the student into thin warm items
because it helps them (warm validation rises with ``kappa`` up to 100 on beauty-2k); the
cold terms, spread over those items as ``1 - g_i`` (the older rule, which files
without the ``hard_cold`` buffer keep: it loads as 0), moved thin warm items whenever
they lifted cold ones, so a large ``kappa`` cost warm users what it gained them. Kept
apart, the best mixed validation figure on beauty-2k split 0 rose from 1.038x to 1.069x
id's.

Warm items carry their ``z`` at ``WARM_Z_SCALE`` (2^-20): a history needs it, and a score
should not (at most ``gamma`` * 2^-20, 3e-5 at gamma 32, against scores of order 1). Small
is also what an HNSW graph wants, built on distances between item vectors, where a
unit-length block that scores nothing is noise: recall@10 against exact search on 20k
untrained served vectors rose from 0.886 to 0.952 with it near 0
(benchmarks/scorer_latency.py's vectors, HNSW forced). Files written before the merge
(no ``z_blocks`` in them) keep two blocks, [cold z (r) | warm z (r)] with the warm one at 2^-10 (or 1
in older ones) and never met by a query (``z_blocks`` 2): every HNSW distance paid for
its r dimensions (a search at 100k items 0.51 ms at 193-d against 0.38 ms at 129-d).

History reads (``content_started``, a teacher whose rows started from the content,
``init_id_rows``): the teacher's encoder reads each history item as the row it trained with,
``e_i`` for an item with interactions, and for one without (held out, or fresh) as the row
it would have started from: the same principal-axes map of its content, which is where a
blocked item's row stays through training (held-out and fresh items are blocked: no gradient
reaches them). Its encoder never saw a student vector. Reading cold items through the
student instead left the composite at 0.938x its teacher over all tail3k users, against
0.994x with these reads (three seeds), and split 1's cold users at 0.40x pooled text's
figure, against 1.24x (docs/quality-mixed.md, stop 45). The read rows ride in a last block
of ``h``, at ``READ_SCALE`` (scored by nothing: the query holds 0 there), so a served
history is still read from index vectors alone; the index keeps that block beside its search
structures (``read_width``; ``scorer/index.py``, silent columns). Without
``content_started`` (a random teacher, or a file from before) a history reads the gated
vectors: cold items as their student vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.files import CorruptFile, load_torch, save_torch
from models.ranking import masked_scores
from models.sasrec import SASRec, SASRecConfig, principal_axes

WARM_Z_SCALE = 2.0**-20  # warm items' z scale (two-block files: 2^-10, or 1 without the buffer)
READ_SCALE = 2.0**-20  # the history-read block's scale: present for the encoder, silent in scores


class Composite(nn.Module):
    def __init__(
        self,
        teacher: SASRec,
        content: torch.Tensor,
        counts: torch.Tensor,
        dropout: float,
        similarity_dims: int = 0,
        recency: float = 0.05,
        z_blocks: int = 1,
        content_started: bool = False,
    ) -> None:
        """``teacher``: a trained ID SASRec (frozen here). ``content``: (N+1, D) content rows,
        row 0 padding. ``counts``: (N+1,) training interactions per item; the student's input
        scaling and axes are fitted on the items with any (the cold ones must not shape it).
        ``similarity_dims``: r, the content axes of the similarity term (0: none);
        ``recency``: the weight of each older history step against the next newer one;
        ``z_blocks``: 1, or 2 for a file from before the content blocks were merged;
        ``content_started``: the teacher's rows started from ``content``'s principal axes,
        fitted on the items with ``counts`` (history reads, above)."""
        super().__init__()
        if teacher.table is not None:
            raise ValueError("the teacher must be an ID SASRec (its own rows are the warm vectors)")
        self.teacher = teacher.requires_grad_(False)
        h = teacher.cfg.hidden
        content = content.float()
        warm = counts > 0
        warm[0] = False
        fit = content[warm]
        self.register_buffer("feat_mean", fit.mean(0))
        self.register_buffer("feat_std", fit.std(0).clamp(min=1e-6))
        d = min(content.shape[1], teacher.cfg.max_input)
        self.r = min(similarity_dims, d)
        if z_blocks not in (1, 2):
            raise ValueError(f"z_blocks must be 1 or 2, got {z_blocks}")
        self.z_blocks = z_blocks
        if content_started and d < min(h, content.shape[1]):  # init_id_rows uses h axes of D
            raise ValueError(f"a content-started teacher reads {h} content axes; the student gets {d}")
        self.content_started = content_started
        width = h + 1 + z_blocks * self.r + (h if content_started else 0)
        self.cfg: SASRecConfig = replace(teacher.cfg, hidden=width)  # scoring width
        self.register_buffer("axes", principal_axes((fit - self.feat_mean) / self.feat_std, d))  # (D, d)
        self.register_buffer("content_in", self._student_input(content), persistent=False)  # (N+1, d)
        # init_id_rows' scale: its rows are the student input's leading h axes, scaled thus
        self.register_buffer("start_scale", h**-0.5 / self._start_rows(self.content_in[warm], 1.0).std())
        self.register_buffer("counts", counts.float())  # (N+1,)
        self.register_buffer("kappa", torch.tensor(0.0))
        self.register_buffer("boost", torch.tensor(0.0))
        self.register_buffer("similarity", torch.tensor(0.0))
        self.register_buffer("recency", torch.tensor(float(recency)))
        self.register_buffer("warm_z_scale", torch.tensor(WARM_Z_SCALE))
        self.register_buffer("hard_cold", torch.tensor(1.0))  # cold terms: items without interactions
        self.student = nn.Sequential(
            nn.Linear(d, d // 2), nn.GELU(), nn.Dropout(dropout), nn.Linear(d // 2, h)
        )
        self._encoded: dict | None = None  # the teacher's queries while ``fixed_queries`` holds

    def _student_input(self, rows: torch.Tensor) -> torch.Tensor:
        return ((rows - self.feat_mean) / self.feat_std) @ self.axes  # (..., d)

    def _start_rows(self, student_input: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """(..., d) student inputs -> (..., h) the rows ``init_id_rows`` starts the teacher at
        (the same standardisation and axes, fitted on the same items; zero past d)."""
        h = self.teacher.cfg.hidden
        return F.pad(student_input[..., :h], (0, max(0, h - student_input.shape[-1]))) * scale

    def _z(self, student_input: torch.Tensor) -> torch.Tensor:
        """(..., d) student inputs -> (..., r) unit content vectors of the similarity term."""
        return F.normalize(student_input[..., : self.r], dim=-1)

    def train(self, mode: bool = True) -> Composite:
        """Only the student trains; the teacher stays in inference mode (no dropout)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def gate(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(n, 1) weight of each item's ID row (of ``ids``, default every row of the
        content table); the rest is the student's vector. An item the teacher never saw
        (added after it trained: ``id > n_items``) has no interactions, so weight 0."""
        return self._gate_of(self._interactions(ids))

    def _gate_of(self, n: torch.Tensor) -> torch.Tensor:
        """(n,) training interactions -> (n, 1) gates."""
        kappa = float(self.kappa)
        g = (n > 0).float() if kappa == 0 else n / (n + kappa)
        return g.unsqueeze(1)

    def _interactions(self, ids: torch.Tensor | None) -> torch.Tensor:
        """(n,) training interactions of ``ids`` (default every row of the content table); 0
        for an item the teacher never saw."""
        ids = torch.arange(len(self.content_in), device=self.counts.device) if ids is None else ids
        n = torch.zeros(ids.shape, device=self.counts.device)
        known = ids <= self.teacher.cfg.n_items
        n[known] = self.counts[ids[known]]
        return n

    def _cold_weight(self, n: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(n, 1) weight of the cold terms (boost, similarity) of items with ``n`` training
        interactions and gates ``g``: 1 for an item without interactions, else 0; ``1 - g``
        in a file from before ``hard_cold``."""
        if not self.hard_cold:
            return 1 - g
        return (n == 0).float().unsqueeze(1)

    def cold_items(self) -> torch.Tensor:
        """(N+1,) bool: the catalogue items without training interactions (padding excluded):
        the fresh items whose exposure a choice without cold validation users calibrates."""
        cold = self._interactions(None) == 0
        cold[0] = False
        return cold

    def use_content(self, content: torch.Tensor) -> Composite:
        """Score a catalogue of ``content`` rows (N'+1, D), which may hold items added after
        the teacher trained (they are cold: the student's vectors): how a retrain compares
        the served composite with a candidate on today's catalogue."""
        self.content_in = self._student_input(content.float().to(self.feat_mean.device))
        return self

    def student_vectors(self) -> torch.Tensor:
        """(N+1, h) the student's vector of every catalogue item."""
        return self.student(self.content_in)

    def _scoring(self, ids: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """(n,) ids and their (n, d) student inputs -> (n, width) scoring vectors:
        [gated vector | o boost | (o + (1 - o) warm_z_scale) z (| read rows READ_SCALE)], all
        0 for padding (two blocks, [... | o z | (1 - o) z warm_z_scale], in a file from
        before)."""
        student = self.student(inputs)  # (n, h)
        n = self._interactions(ids)  # (n,)
        g = self._gate_of(n)  # (n, 1)
        rows = torch.zeros_like(student)
        known = (ids > 0) & (ids <= self.teacher.cfg.n_items)
        rows[known] = self.teacher.item_vectors(ids[known]).to(rows.dtype)
        o = self._cold_weight(n, g)  # (n, 1)
        z = self._z(inputs)  # (n, r)
        parts = [g * rows + (1 - g) * student, o * self.boost]
        if self.z_blocks == 1:
            parts.append((o + (1 - o) * self.warm_z_scale) * z)
        else:
            parts += [o * z, (1 - o) * z * self.warm_z_scale]
        if self.content_started:  # a history's reads: the ID row if it trained, else its start
            read = torch.where(n.unsqueeze(1) > 0, rows, self._start_rows(inputs, self.start_scale))
            parts.append(read * READ_SCALE)
        return torch.cat(parts, 1).masked_fill((ids == 0).unsqueeze(1), 0.0)

    def gated_vectors(self) -> torch.Tensor:
        """(N+1, h) each item's scoring vector in the teacher's space."""
        return self.item_vectors()[:, : self.teacher.cfg.hidden]

    def item_vectors(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``Recommender``: scoring vectors of ``idx`` (any shape) or of all: (N+1, width)."""
        ids = torch.arange(len(self.content_in), device=self.counts.device)
        table = self._scoring(ids, self.content_in)  # (N+1, width)
        return table if idx is None else table[idx]

    def vectors_of(self, ids: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """Serving: (n,) catalogue ids and their (n, D) content rows -> (n, width) scoring
        vectors. An item the teacher trained on is gated as in training; any other (a
        fresh item, or one with no interactions then) is the student's, fully boosted."""
        return self._scoring(ids, self._student_input(content.float()))

    def content_vectors(self, content: torch.Tensor) -> torch.Tensor:
        """``Recommender``: a fresh item's scoring vector from its content row alone (the
        student, fully boosted: it has no interactions). (n, D) -> (n, width)."""
        ids = torch.full((len(content),), self.teacher.cfg.n_items + 1, device=self.counts.device)  # unseen
        return self.vectors_of(ids, content)

    def query(self, history: torch.Tensor) -> torch.Tensor:
        """``Recommender``: (B, T, width) scoring vectors, no padding -> (B, width),
        through the teacher's encoder (which reads ``_reads``)."""
        history = history[:, -self.teacher.cfg.max_len :]  # as evaluation reads
        valid = torch.ones(history.shape[:2], dtype=torch.bool, device=history.device)
        return self._query_vector(self.teacher.query(self._reads(history)), history, valid)

    def read_width(self) -> int:
        """How many trailing scoring columns are the read block (0 without one): no query
        meets them, so an index need not search them."""
        return self.teacher.cfg.hidden if self.content_started else 0

    def _reads(self, history: torch.Tensor) -> torch.Tensor:
        """(..., width) scoring vectors -> (..., h) what the teacher's encoder reads: the
        read block where there is one, else the gated vector (history reads, above)."""
        h = self.teacher.cfg.hidden
        return history[..., -h:] / READ_SCALE if self.content_started else history[..., :h]

    def user_vector(self, seqs: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) left-padded ids -> (B, width); ``table`` (``item_vectors()``) saves
        recomputing it."""
        table = self.item_vectors() if table is None else table
        history, valid = table[seqs], seqs > 0  # (B, T, width), (B, T)
        return self._query_vector(self._encode(seqs, history, valid), history, valid)

    def _encode(self, seqs: torch.Tensor, history: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The teacher's (B, h) query of (B, T) ``seqs``, read from ``fixed_queries``'
        memo where it holds: keyed by the ids, as the teacher, the student, the counts and
        the content are fixed there, and by the gate unless the read block is what the
        encoder reads (it holds no gate: one encoding serves the whole choice grid)."""
        key = None
        if self._encoded is not None:
            gate = None if self.content_started else float(self.kappa)
            key = (gate, tuple(seqs.shape), seqs.cpu().numpy().tobytes())
            if key in self._encoded:
                return self._encoded[key]
        u = self.teacher.encode(self._reads(history), valid)[:, -1]  # (B, h)
        if key is not None:
            self._encoded[key] = u
        return u

    @contextmanager
    def fixed_queries(self) -> Iterator[Composite]:
        """Within it, each history's teacher query is computed once per gate ``kappa``, and
        once in all when the encoder reads the read block (``content_started``: it holds no
        gate): the boost and the similarity weight only add blocks to the scoring vectors,
        never to what the encoder reads, so a grid over them (``training/composite.py``)
        re-encodes nothing (3.5x faster choices on beauty-2k). The teacher, the student, the counts
        and the content (``use_content``) must not change inside it, and callers pass no
        ``table`` of their own to ``user_vector`` there."""
        self._encoded = {}
        try:
            yield self
        finally:
            self._encoded = None

    def _query_vector(self, u: torch.Tensor, history: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The teacher's (B, h) query, and the history's (B, T, width) scoring vectors with
        (B, T) real steps -> (B, width): [u | 1 | gamma m_u] (a 0 block more for two z
        blocks, and for the read block),
        ``m_u`` the history's recency-weighted mean content vector. Each step's ``z`` is its
        block made unit length again, whatever scale it is stored at."""
        h, r = self.teacher.cfg.hidden, self.r
        if self.z_blocks == 1:
            z = F.normalize(history[..., h + 1 : h + 1 + r], dim=-1)  # (B, T, r)
        else:
            z = history[..., h + 1 : h + 1 + r] + history[..., h + 1 + r : h + 1 + 2 * r] / self.warm_z_scale
        T = valid.shape[1]
        w = self.recency ** torch.arange(T - 1, -1, -1, device=u.device, dtype=u.dtype) * valid  # (B, T)
        m = (w.unsqueeze(2) * z).sum(1) / w.sum(1, keepdim=True).clamp(min=1e-12)  # (B, r)
        one = torch.ones(len(u), 1, device=u.device, dtype=u.dtype)
        parts = [u, one, self.similarity * m] + [torch.zeros_like(m)] * (self.z_blocks - 1)
        if self.content_started:
            parts.append(torch.zeros_like(u))  # the read block scores nothing
        return torch.cat(parts, 1)

    def predict(self, seqs: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """``Recommender``: (B, T) ids -> (B, N+1) scores (padding, ``blocked``: -inf)."""
        table = self.item_vectors()  # (N+1, width)
        return masked_scores(self.user_vector(seqs, table), table, blocked)


def save_composite(path: Path, model: Composite, meta: dict) -> Path:
    """Teacher, student and their buffers (not the content table: serving maps each item's
    content row with ``vectors_of``) plus metadata, atomically, as plain tensors."""
    save_torch(
        {
            "kind": "composite",
            "config": asdict(model.teacher.cfg),
            "content_dim": model.feat_mean.shape[0],
            "dropout": model.student[2].p,
            "similarity_dims": model.r,
            "z_blocks": model.z_blocks,
            "content_started": model.content_started,
            "state": {k: v.cpu() for k, v in model.state_dict().items()},
            "meta": meta,
        },
        path,
    )
    return path


def load_composite(path: Path, content: torch.Tensor | None = None) -> tuple[Composite, dict]:
    """A saved composite (inference mode); with ``content`` (N'+1, D) it also scores by
    catalogue index (``use_content``). A file of another kind raises ``CorruptFile``."""
    return composite_from(load_torch(path), str(path), content)


def composite_from(saved: dict, source: str, content: torch.Tensor | None = None) -> tuple[Composite, dict]:
    """``load_composite`` of a file already read (``source`` names it in errors): a
    caller that dispatches on a file's kind reads and checks it once."""
    try:
        if saved.get("kind") != "composite":
            raise ValueError("not a composite")
        cfg = SASRecConfig(**saved["config"])
        n = cfg.n_items + 1
        # placeholders of the right shapes; every buffer and weight comes from the file
        r = saved.get("similarity_dims", 0)  # 0: a file from before the similarity term
        placeholder = torch.zeros(n, saved["content_dim"])
        z_blocks = saved.get("z_blocks", 2)  # 2: a file from before the blocks were merged
        started = saved.get("content_started", False)  # False: a file from before the read block
        shape = {"z_blocks": z_blocks, "content_started": started}
        model = Composite(SASRec(cfg), placeholder, torch.ones(n), saved["dropout"], r, **shape)
        defaults = {"similarity": torch.tensor(0.0), "recency": model.recency}  # ditto
        defaults["warm_z_scale"] = torch.tensor(1.0)  # a file from before the scaled warm block
        defaults["hard_cold"] = torch.tensor(0.0)  # a file from before: cold terms by 1 - gate
        defaults["start_scale"] = torch.tensor(1.0)  # a file from before the read block (unused)
        model.load_state_dict(defaults | saved["state"])
    except (AttributeError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise CorruptFile(f"{source}: not a composite scorer file ({type(exc).__name__}: {exc})") from exc
    if content is not None:
        model.use_content(content)
    return model.eval(), saved["meta"]
