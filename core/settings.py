"""All configuration, read once from the environment (prefix ``SAID_``), in sections.

One place for every key keeps config from spreading over modules; each field says its
type, default and meaning, and pydantic rejects a bad value at start-up with a clear error
instead of failing deep inside a consumer.

Values that travel together form a section (``align``, ``scorer``, ``retrain``, ...): a
service takes its section whole, and an override is ``section.model_copy(update=...)``
(sections are frozen, so nobody changes a shared one in place). The environment names stay
flat, as documented in docs/configuration.md: a section field's variable is ``SAID_`` + the section's
``env_prefix`` + the field name (``SAID_ALIGN_EPOCHS`` is ``align.epochs``), or the name in
its ``env`` extra where the historical name differs (``SAID_SOFT_TOKENS`` is ``align.k``).
``Settings(kafka_bootstrap=...)`` takes the same flat names, for tests and tools.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

# The scorer variants ``said dataset evaluate`` compares (training.evaluate builds each one).
# ``composite-<content>``: the warm/cold composite (ID teacher, content student); mixed
# protocol only.
Composite = Literal["composite-said", "composite-text", "composite-said+text"]
# ``blend-text``: the composite's ID side, the text scorer for cold items (models/blend.py);
# an evaluation diagnostic, mixed protocol only, not served. ``said-init`` / ``text-init``: ID
# scorers whose rows start from the SAID / pooled-text table (``models.sasrec.init_id_rows``).
# ``composite-said-joint`` (teacher ``said-joint-init``): ``composite-said`` on an alignment of
# every item together, cold ones included, instead of the fresh path's rows; a diagnostic of
# what the fresh path costs (issue 22), not servable: it would realign the catalogue per item.
Variant = Literal[
    "id",
    "text",
    "said",
    "said+text",
    "prompt",
    "hybrid",
    "said-init",
    "text-init",
    Composite,
    "blend-text",
    "said-joint-init",
    "composite-said-joint",
]


def env(name: str) -> dict[str, str]:
    """A field's environment name (without ``SAID_``) where it is not prefix + field name."""
    return {"env": name}


class Section(BaseModel):
    """A group of settings that always travel together; frozen (override: ``model_copy``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    env_prefix: ClassVar[str] = ""


class KafkaSettings(Section):
    """How to reach the brokers, and how `said topics create` makes topics."""

    env_prefix: ClassVar[str] = "kafka_"
    bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    security_protocol: str = Field("PLAINTEXT", description="Passed to librdkafka (`SSL`, `SASL_SSL`, ...).")
    sasl_mechanism: str | None = Field(None, description="e.g. PLAIN, SCRAM-SHA-512.")
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(None, description="SASL password (no default).")
    ssl_ca_location: str | None = Field(None, description="CA bundle for broker TLS.")
    ssl_certificate_location: str | None = Field(None, description="Client cert (mTLS).")
    ssl_key_location: str | None = Field(None, description="Client key (mTLS).")
    ssl_key_password: SecretStr | None = Field(None, description="Client key password.")
    topic_partitions: int = Field(4, ge=1, description="Partitions of topics `said topics create` makes.")
    replication_factor: int = Field(1, ge=1, description="Replicas of each topic it makes (production: 3).")
    min_insync_replicas: int = Field(
        1, ge=1, description="Topic min.insync.replicas it sets (production: 2; acks=all writes need them)."
    )

    def client_config(self) -> dict[str, str]:
        """librdkafka settings shared by producers and consumers, security passed through."""
        conf = {"bootstrap.servers": self.bootstrap, "security.protocol": self.security_protocol}
        optional = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password.get_secret_value() if self.sasl_password else None,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf


class ConsumeSettings(Section):
    """The consumers: groups, batches, and what they refuse or park."""

    group_id: str = Field("said", description="Consumer-group prefix (`said.items`, `said.interactions`).")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Group session timeout (tests use 2000).")
    batch: int = Field(
        5000,
        ge=1,
        le=100_000,
        description="Messages per consumed batch (one DB transaction).",
        json_schema_extra=env("consume_batch"),
    )
    audit_log: Path | None = Field(
        None,
        description="Append `topic partition offset` of each processed message (re-deliveries audit).",
        json_schema_extra=env("consumer_audit_log"),
    )
    max_message_bytes: int = Field(
        64_000,
        ge=256,
        le=900_000,
        description=(
            "Larger messages go to the DLQ (`too_large`), cut to this many bytes (at most 900000,"
            " so the copy fits the producer's limit)."
        ),
    )
    max_future_skew_s: float = Field(
        3600.0, gt=0, description="Events stamped further ahead of now go to the DLQ (future_time)."
    )
    dlq_max_attempts: int = Field(
        5, ge=1, description="`said dlq replay` leaves a message dead-lettered this many times where it is."
    )
    park_max_age_s: float = Field(
        86_400.0,
        gt=0,
        description=(
            "Interactions parked for an unknown item go to the DLQ (`unknown_item`) after this age."
        ),
    )
    park_sweep_s: float = Field(
        5.0,
        gt=0,
        description="How often each interaction consumer looks for parked interactions past their age.",
    )
    park_sweep_budget_s: float = Field(
        5.0,
        gt=0,
        description=(
            "Longest one sweep drains expired parked interactions (pages of 500) before consuming"
            " again; a sweep cut short runs again right after one poll (a batch, if one waits)."
        ),
    )
    park_max_per_item: int = Field(
        10_000,
        ge=1,
        description=(
            "Most interactions parked for one missing item; more go to the DLQ at once (`park_overflow`)."
        ),
    )
    park_max_total: int = Field(
        1_000_000,
        ge=1,
        description="Most interactions parked in all; more go to the DLQ at once (`park_overflow`).",
    )
    max_text_chars: int = Field(2000, ge=16, description="Longest accepted title+description.")


class RefineSettings(Section):
    """How fresh rows are refined alone (projector and LLM frozen): the worker's path."""

    env_prefix: ClassVar[str] = "refine_"
    max_passes: int = Field(
        100,
        ge=0,
        description="Most refinement passes over a micro-batch (0: first estimates only).",
        json_schema_extra=env("refine_epochs"),
    )
    lr: float = Field(0.3, gt=0, description="Rate of the fresh rows.")
    target_accuracy: float | None = Field(
        None,
        gt=0,
        le=1.01,
        description=(
            "Token accuracy fresh rows are refined to; unset = the catalogue's (its mean token accuracy)."
        ),
    )
    batch: int = Field(
        16,
        ge=1,
        description="Fresh rows per refinement step (worker, reference cohort, evaluation).",
    )


class FidelitySettings(Section):
    """How much of an alignment's fidelity is measured (decoding is the slow part)."""

    exact_items: int = Field(
        512,
        ge=1,
        description="Items greedily decoded to measure exact rebuild.",
        json_schema_extra=env("fidelity_exact_items"),
    )
    reference_items: int = Field(
        16, ge=1, description="Catalogue items put through the fresh path as reference."
    )


class AlignSettings(Section):
    """One SAID alignment: the aligner's shape, the schedule, and its fresh-row path."""

    env_prefix: ClassVar[str] = "align_"
    k: int = Field(
        4,
        ge=1,
        le=16,
        description="k soft tokens per item; all k are kept (concatenated) in the item vector.",
        json_schema_extra=env("soft_tokens"),
    )
    item_dim: int = Field(
        128,
        ge=8,
        description="Width of the item ID rows before the projector.",
        json_schema_extra=env("item_dim"),
    )
    prompt: str = Field(
        " Item text:",
        description="Fixed prompt between soft tokens and text.",
        json_schema_extra=env("prompt"),
    )
    lora_rank: int = Field(
        0,
        ge=0,
        le=256,
        description=(
            "LoRA rank trained with the aligner in `said aligner train` / `said dataset evaluate` and loaded "
            "frozen by the worker; 0 = frozen LLM."
        ),
        json_schema_extra=env("lora_rank"),
    )
    epochs: int = Field(24, ge=1, description="Most passes over all items.")
    batch_size: int = Field(
        16, ge=1, description="Items per alignment step.", json_schema_extra=env("align_batch")
    )
    lr_rows: float = Field(0.3, gt=0, description="Rate of the item rows (one step a pass).")
    lr_proj: float = Field(1e-2, gt=0, description="Projector rate at batch 16 (sqrt-scaled).")
    row_optimizer: str = Field("adagrad", description="rowadam, adagrad or sparseadam (fresh rows too).")
    lr_final: float = Field(0.1, gt=0, le=1, description="Cosine decay of the rates to this.")
    warmup: float = Field(0.05, ge=0, lt=1, description="Projector warm-up, share of the run.")
    acc_bar: float = Field(
        1.0, ge=0, le=1.01, description="Token accuracy that ends an item (0: one pass each)."
    )
    recheck_every: int = Field(3, ge=1, description="Passes between re-checks of done items.")
    checkpoint_every_s: float = Field(
        120.0, ge=0, description="Mid-pass checkpoint period (0: after every batch)."
    )
    seed: int = Field(0, description="Seed of the alignment.")
    compile: bool = Field(
        False,
        description="Run the catalogue alignment's training steps through `torch.compile`: 13-27% "
        "more items/s on the 2-core CPU (docs/speed.md), after about 4 minutes of compiling, or "
        "10-20 s from inductor's on-disk cache. It pays from about 30,000 item-passes with a cold "
        "cache (beauty-2k's alignment: at most 48,000), about 2,000 with a warm one.",
    )
    bootstrap_min_items: int = Field(
        100,
        ge=1,
        description="Catalogue items `said aligner train --if-none` (compose's bootstrap) waits for "
        "before the first alignment: the fresh-item path is fitted on them.",
    )
    refine: RefineSettings = Field(default_factory=RefineSettings)
    fidelity: FidelitySettings = Field(default_factory=FidelitySettings)

    def schedule(self) -> dict[str, Any]:
        """What a training checkpoint must share with the run that resumes it: everything
        but the number of passes (more may be asked for), the save period, and ``compile``
        (how fast the same steps run, not which steps)."""
        return self.model_dump(
            exclude={
                "epochs",
                "checkpoint_every_s",
                "refine",
                "fidelity",
                "prompt",
                "lora_rank",
                "bootstrap_min_items",
                "compile",
            }
        )


class WorkerSettings(Section):
    """The streaming worker (`said worker run`)."""

    env_prefix: ClassVar[str] = "worker_"
    batch: int = Field(16, ge=1, description="Items leased per micro-batch.")
    lease_ttl_s: float = Field(600.0, gt=0, description="A crashed worker's items return after.")
    id: str | None = Field(
        None,
        min_length=1,
        description=(
            "Lease owner id, unique per worker and stable across its restarts; `{hostname}` in it"
            " is replaced by the host's name (compose replicas: `updater-{hostname}`); unset = "
            "host-pid."
        ),
    )
    version_check_s: float = Field(
        5.0, gt=0, description="How often the worker checks for a newly activated aligner."
    )
    poll_s: float = Field(
        0.1,
        gt=0,
        description="How often the worker looks for new items to estimate (one short write transaction).",
    )


class ScorerSettings(Section):
    """How a SASRec scorer trains (`said dataset evaluate` and `said scorer train` alike)."""

    env_prefix: ClassVar[str] = "scorer_"
    epochs: int = Field(200, ge=1, description="Most SASRec epochs (early stopping).")
    batch_size: int = Field(
        256, ge=1, description="Users per SASRec step.", json_schema_extra=env("scorer_batch")
    )
    lr: float = Field(1e-3, gt=0, description="SASRec Adam rate.")
    weight_decay: float = Field(
        0.0, ge=0, description="SASRec Adam weight decay (`said-init`'s cold rows stay put only at 0)."
    )
    patience: int = Field(8, ge=1, description="Validations without gain before stopping.")
    eval_every: int = Field(2, ge=1, description="Epochs between validations.")
    length_batches: bool = Field(
        False,
        description=(
            "Batch users of similar history length: 3x faster on CPU, a little worse (id: "
            "validation NDCG@10 0.092 vs 0.102)."
        ),
    )
    seed: int = Field(0, description="Seed of a scorer training (and of a retrain's validation slices).")


class CompositeSettings(Section):
    """The warm/cold composite (models/composite.py): how its student (content -> the ID
    teacher's item space) trains, and its gate."""

    env_prefix: ClassVar[str] = "composite_"
    teacher_init: Literal["content", "random"] = Field(
        "content",
        description=(
            "Where the ID teacher's item rows start: 'content', at the content table's leading "
            "principal axes (models.sasrec.init_id_rows, as LLM-ESR and LLMInit start ID rows), "
            "so a thin item keeps its content's place and a new one starts there; 'random', as "
            "the plain `id` scorer. With pooled text ('text-init') it beat 'random' on every "
            "draw measured (docs/quality-mixed.md, a teacher that starts from content); the "
            "served teacher starts from the rows of `content`; from SAID vectors "
            "('said-init'): 1.04x and 1.11x `id` on two beauty-2k draws, 3-4% behind "
            "'text-init' (stop 47)."
        ),
    )
    content: Literal["said", "text"] = Field(
        "said",
        description=(
            "What the served student maps into the teacher's space, and where the served "
            "teacher's rows start: 'said', the aligner's SAID vectors; 'text', the pooled LLM "
            "text features every writer stores beside them (a fresh item's text row is final "
            "at its first estimate). Validation cannot tell them apart: over four draws "
            "(beauty-2k splits 0-2, tail3k) it preferred 'text' on three by 0.0007-0.0033 and "
            "'said' on one by 0.0049, means 0.0872 and 0.0872; test preferred 'text' on three "
            "(1.13x, 1.24x, 1.28x `id`, against 1.06x, 1.18x, 1.22x) and 'said' on split 1 "
            "(1.14x against 1.09x), where validation had picked 'text' (docs/quality-mixed.md, "
            "stop 49). Read by the retrainer: a change is due at its next poll, and a 'text' "
            "retrain waits until the worker has stored the text rows of items aligned before "
            "they were stored (docs/operations.md)."
        ),
    )
    epochs: int = Field(
        60, ge=1, description="Most student epochs (early stopping on the cold-validation users)."
    )
    patience: int = Field(
        15,
        ge=1,
        description="Full windows of student epochs (`window`) without a better mean before "
        "stopping. The cold-validation figure it stops on is noisy (a few hundred users): with "
        "single epochs and patience 6, both beauty-2k split 2 students stopped at epoch 7 on "
        "epoch 1's spike, 0.94x (pooled text) and 0.99x (SAID) their teachers; at 15 they "
        "trained 55-59 epochs, 1.07x and 1.08x (docs/quality-mixed.md, stop 47).",
    )
    window: int = Field(
        5,
        ge=1,
        description="Student epochs judged together: early stopping compares the mean of the "
        "last `window` epochs' stopping figures (the cold-validation users' MRR; the warm "
        "users' NDCG@10 where too few are cold), and the kept student is the mean of those "
        "epochs' weights (training.composite.WindowStop); capped at `epochs`. At 1, the single "
        "best epoch is kept: its luckiest draw of a figure that moves by +-0.002 between "
        "epochs. Neutral on two beauty-2k draws; on tail3k +3% for the text composite, and the "
        "SAID one kept its cold users (2.41x text, 0.31x at 1) (docs/quality-mixed.md, stop 48).",
    )
    lr: float = Field(1e-3, gt=0, description="Student Adam rate.")
    batch_size: int = Field(1024, ge=1, description="Teacher user states per student step.")
    tau: float = Field(1.0, gt=0, description="Softmax temperature of the score-distribution term.")
    align_weight: float = Field(1.0, ge=0, description="Weight of the embedding term (student row ~ ID row).")
    rank_weight: float = Field(
        1.0, ge=0, description="Weight of the score-distribution term (KL to teacher)."
    )
    supervised_weight: float = Field(
        1.0,
        ge=0,
        description="Weight of the supervised term: cross-entropy of the item that came next, "
        "scored by the student's vectors under the teacher's query (ALDI's supervised loss).",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="Student dropout.")
    gate_kappas: tuple[float, ...] = Field(
        (0.0, 3.0, 10.0, 30.0, 100.0),
        description=(
            "Gate candidates, comma-separated: g = n/(n+kappa), 0 = hard switch; see choose. "
            "Up to 100: warm validation still rises there on beauty-2k (the student helps "
            "items with dozens of clicks), now that the cold terms leave warm items alone."
        ),
    )

    boosts: tuple[float, ...] = Field(
        (-16.0, -12.0, -8.0, -6.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0),
        description=(
            "Score offset of items without interactions (calibration; older model files: of "
            "student-scored items, by 1 - gate) candidates, comma-separated; "
            "picked with the gate and the similarity on validation. Negative ones lower a "
            "student that scores its items above the warm ones (a small catalogue's student: "
            "its items flooded warm users' top 10), and with a similarity weight they set its "
            "threshold (-8 with 16: a cold item gains only where its content's inner product "
            "with the history's exceeds 0.5)."
        ),
    )
    similarities: tuple[float, ...] = Field(
        (0.0, 4.0, 8.0, 16.0, 32.0),
        description=(
            "Weight candidates of the content-similarity term of items without interactions (the "
            "inner product of their unit content vector with the recency-weighted mean of the "
            "history's, models/composite.py), comma-separated; picked with the gate and the "
            "boost on validation (with no cold signal, by fresh items' share of warm users' "
            "top 10, nearest their share of the catalogue: training/composite.py, choose). "
            "0: off."
        ),
    )
    similarity_dims: int = Field(
        64,
        ge=0,
        description=(
            "Content axes the similarity term compares (the student input's leading "
            "principal axes, at most its width); scoring vectors grow by that much. 0: no "
            "similarity term."
        ),
    )
    similarity_recency: float = Field(
        0.05,
        ge=0,
        le=1,
        description=(
            "Weight of each older history step against the next newer one in the similarity "
            "term's history vector: 0.05 is mostly the last item, which beat 0.5 on beauty-2k "
            "validation (a brand's line is bought after that brand's last item)."
        ),
    )

    warm_tolerance: float = Field(
        0.02,
        ge=0,
        lt=1,
        description=(
            "How much warm validation NDCG@10 the choice of gate, boost and similarity may give "
            "up: only choices within this share of the ID teacher's warm figure (with "
            "cold-validation users; else of the best choice's), or of the best choice's where "
            "that is lower, are served (then cold_tolerance; training/composite.py, choose). "
            "0.02: the target's own allowance, warm users at 0.98 x the ID scorer. With no "
            "cold signal it is also what fresh items' exposure may cost warm users."
        ),
    )
    cold_tolerance: float = Field(
        0.25,
        ge=0,
        le=1,
        description=(
            "How much of the best cold validation NDCG@10 (among the choices warm_tolerance "
            "keeps) the choice may give up for all users: of the choices within this share of "
            "it, the best mixed validation figure is served (training/composite.py, choose). "
            "0: the best cold figure whatever it costs the rest; 1: the best mixed figure with "
            "warm users guarded only. 0.25: chosen on stop 44's validation grids, where it was "
            "the largest share keeping cold users above `text`'s validation figure wherever a "
            "choice could; on stop 45's, only 0.0 does, by 0.0001 on one tail3k seed, and 0.4 "
            "falls below on beauty-2k split 0 (docs/quality-mixed.md). (0.5 with the randomly "
            "started teacher.)"
        ),
    )

    @field_validator("gate_kappas", "boosts", "similarities", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        return tuple(float(x) for x in v.split(",")) if isinstance(v, str) else v


class RetrainSettings(Section):
    """When `said scorer train --watch` retrains, and how much it validates on."""

    env_prefix: ClassVar[str] = "retrain_"
    min_interactions: int = Field(
        10_000, ge=1, description="New interactions since the last scorer attempt that trigger a retrain."
    )
    min_items: int = Field(
        500, ge=1, description="New items since the last scorer attempt that trigger a retrain."
    )
    epochs: int = Field(
        30, ge=1, description="Most epochs per retrain (early stopping); overrides SAID_SCORER_EPOCHS."
    )
    valid_users: int = Field(2000, ge=1, description="Validation slice of a retrain.")
    min_group_users: int = Field(
        30,
        ge=1,
        description="Fewest warm- or cold-target promotion users whose comparison can refuse a "
        "candidate (a smaller group's scores are kept but decide nothing: its interval is noise).",
    )
    cold_share: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of the items (fixed by a hash of the index) that a first retrain, with no "
        "active version to date them by, holds out as its cold-validation items.",
    )
    poll_s: float = Field(30.0, gt=0, description="How often the retrainer checks counts.")


class IndexSettings(Section):
    """Each scorer replica's FAISS index."""

    hnsw_min_items: int = Field(50_000, ge=1, description="Index size from which HNSW replaces exact search.")
    hnsw_ef_search: int = Field(
        128,
        ge=1,
        description=(
            "HNSW candidate list per search (efSearch): recall against a search's time. On the "
            "latency benchmark's untrained served vectors at 100k items (efConstruction 200), 128 "
            "gives recall@10 0.86 in 0.4 ms, 512 gives 0.99 in 1.1 ms; on clustered ones 128 gives "
            "0.975 (docs/results.md)."
        ),
    )
    hnsw_ef_construction: int = Field(
        200,
        ge=1,
        description=(
            "HNSW candidate list while building (efConstruction): a better graph, so higher recall "
            "at the same efSearch, against build time (a scorer's first build and each "
            "compaction; a replica that loads a snapshot keeps its graph until it compacts). On "
            "the latency benchmark's untrained served vectors at 100k items and "
            "efSearch 128, 80 gives recall@10 0.73-0.75, 200 gives 0.86-0.87 (a build 2.7-3x as long), "
            "400 gives 0.91 (5x) (docs/results.md)."
        ),
    )
    snapshot_every_s: float = Field(
        300.0, gt=0, description="How often a scorer writes its index snapshot (the newest 3 are kept)."
    )
    refresh_s: float = Field(
        0.25,
        gt=0,
        description=(
            "How often a scorer replica applies new embeddings, text and serving-state changes "
            "and follows new versions: a fresh item's wait to be servable, a withdrawn one's to "
            "be gone (the demo: 0.2)."
        ),
        json_schema_extra=env("index_refresh_s"),
    )
    popular_refresh_s: float = Field(
        60.0,
        gt=0,
        description=(
            "How often a replica re-reads the popular items that a user with no usable history is shown."
        ),
    )
    fallback_popular: int = Field(
        1000, ge=1, description="Most popular items a fallback ranking (a user with no history) draws from."
    )
    query_cache_size: int = Field(
        10_000,
        ge=0,
        description=(
            "Query vectors a replica keeps, by a digest of the history vectors each was computed "
            "from (never stale): a known user's repeated request skips the encoder. 0: off."
        ),
    )
    fallback_fresh: int = Field(
        256,
        ge=1,
        description=(
            "Newest indexed items a fallback ranking draws from, in turn with the popular ones, "
            "so new ads get exposure."
        ),
    )


class ApiSettings(Section):
    """The HTTP scorer (`said scorer serve`)."""

    env_prefix: ClassVar[str] = "api_"
    port: int = Field(8000, ge=1, le=65535, description="Port of `said scorer serve` and the demo's API.")
    token: SecretStr | None = Field(
        None,
        description=(
            "Bearer token of `POST /recommend` and `GET /items/{id}`; required when `said scorer serve` "
            "listens off loopback; an empty value is refused; redacted in logs."
        ),
    )
    history_len: int = Field(
        50, ge=1, description="Most recent positive interactions a `user_id` request builds its query from."
    )

    @field_validator("token")
    @classmethod
    def _token_not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        # SAID_API_TOKEN="" must not mean "no auth": a typo in a deployment fails closed.
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("SAID_API_TOKEN is empty: unset it (loopback only) or set a real token")
        if v is not None and v.get_secret_value() != v.get_secret_value().strip():
            raise ValueError("SAID_API_TOKEN has surrounding whitespace, which no client can send")
        return v


class EvaluateSettings(Section):
    """`said dataset evaluate`."""

    variant: Variant = Field(
        "composite-text",
        description="Variant `said dataset evaluate` compares with id and text by default, best on mixed "
        "validation.",
        json_schema_extra=env("evaluate_variant"),
    )


class DemoSettings(Section):
    """`said demo`."""

    env_prefix: ClassVar[str] = "demo_"
    items: int = Field(200, ge=10, description="Size of the demo's item slice.")
    align_epochs: int = Field(16, ge=1, description="Most alignment passes in the demo.")
    align_batch: int = Field(
        8, ge=1, description="Alignment batch of the demo (more projector steps a pass)."
    )
    fresh: int = Field(5, ge=1, description="Brand-new items the demo publishes.")
    decoded: int = Field(
        100,
        ge=1,
        description="Catalogue items the demo greedily decodes for its exact-rebuild figure (the "
        "slow part of its fidelity pass: 200 took 15 s of a 5-minute demo); in the demo it "
        "replaces SAID_FIDELITY_EXACT_ITEMS.",
    )
    reference_items: int = Field(
        8,
        ge=1,
        description="Catalogue items the demo puts through the fresh path as a reference (16 took "
        "36 s of a 5-minute demo); in the demo it replaces SAID_REFERENCE_ITEMS.",
    )


SECTIONS: dict[str, type[Section]] = {
    "kafka": KafkaSettings,
    "consume": ConsumeSettings,
    "align": AlignSettings,
    "worker": WorkerSettings,
    "scorer": ScorerSettings,
    "composite": CompositeSettings,
    "retrain": RetrainSettings,
    "index": IndexSettings,
    "api": ApiSettings,
    "evaluate": EvaluateSettings,
    "demo": DemoSettings,
}


def _flat_names(cls: type[Section], path: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Flat name (lower case, no ``SAID_``) -> field path, for a section and its sub-sections."""
    out: dict[str, tuple[str, ...]] = {}
    for name, info in cls.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            out |= _flat_names(sub, (*path, name))
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        out[str(extra.get("env", cls.env_prefix + name))] = (*path, name)
    return out


# Every flat section key: ``kafka_bootstrap`` -> ("kafka", "bootstrap").
FLAT: dict[str, tuple[str, ...]] = {}
for _section, _cls in SECTIONS.items():
    FLAT |= _flat_names(_cls, (_section,))


class _FlatEnvironment(PydanticBaseSettingsSource):
    """The ``SAID_*`` variables of section fields, by flat name (nested by ``Settings``)."""

    def get_field_value(self, field, field_name):  # noqa: ANN001, ANN201 (pydantic-settings API)
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        environ = {k.upper(): v for k, v in os.environ.items()}
        return {flat: environ[f"SAID_{flat.upper()}"] for flat in FLAT if f"SAID_{flat.upper()}" in environ}


class Settings(BaseSettings):
    """Typed settings; ``SAID_<NAME>`` in the environment overrides each default."""

    model_config = SettingsConfigDict(env_prefix="SAID_", extra="ignore")

    # --- storage and the LLM (shared by every process) ----------------------------------
    database_url: str = Field(
        "sqlite:///./said.db", description="Catalogue; e.g. `postgresql+psycopg://user:pw@host/db`."
    )
    db_retry_max_s: float = Field(
        30.0, gt=0, description="Cap of the exponential backoff while the database is down."
    )
    data_dir: Path = Field(Path("./said-data"), description="Snapshots, weights, LLM cache.")
    llm: str | None = Field(None, description="Local HF folder or .gguf; default SmolLM2 GGUF.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` (CUDA with bf16 when present) | `cpu` | `cuda`."
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description=(
            "LLM attention kernel: `auto` (eager on CPU, where its backward is 22% faster at "
            "alignment lengths; sdpa on CUDA) | `eager` | `sdpa`."
        ),
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="Prometheus `/metrics` port of the process; 0 = off."
    )
    positives: Annotated[tuple[Literal["click", "conversion"], ...], NoDecode] = Field(
        ("click", "conversion"),
        min_length=1,
        description="Interaction types that are training positives and make up the history a "
        "query is built from, comma-separated. Impressions never are: on an ad platform most "
        "events are impressions, and a model trained on them learns what was already shown.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Interactions and parked interactions whose event is older than this many days "
        "are deleted (by the watching retrainer, hourly, and by `said users prune`); "
        "unset keeps them all.",
    )
    log_level: str = Field("INFO", description="Python logging level.")

    # --- sections: each service takes its own whole -----------------------------------
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    consume: ConsumeSettings = Field(default_factory=ConsumeSettings)
    align: AlignSettings = Field(default_factory=AlignSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    scorer: ScorerSettings = Field(default_factory=ScorerSettings)
    composite: CompositeSettings = Field(default_factory=CompositeSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    index: IndexSettings = Field(default_factory=IndexSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    demo: DemoSettings = Field(default_factory=DemoSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # keyword arguments first, then the flat section variables, then the top-level ones
        return init_settings, _FlatEnvironment(settings_cls), env_settings

    @field_validator("positives", mode="before")
    @classmethod
    def _types(cls, v: object) -> object:
        return tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_names(cls, data: Any) -> Any:
        """``kafka_bootstrap=...`` -> ``kafka={"bootstrap": ...}``; a value given nested wins."""
        if not isinstance(data, dict):
            return data
        out = {k: v for k, v in data.items() if k not in FLAT}
        for flat, path in FLAT.items():
            if flat not in data:
                continue
            node = out
            for part in path[:-1]:
                child = node.get(part, {})
                node[part] = child = child.model_dump() if isinstance(child, BaseModel) else dict(child)
                node = child
            node.setdefault(path[-1], data[flat])
        return out

    def override(self, **flat: Any) -> Settings:
        """A copy with some values changed, by flat name (``kafka_bootstrap=...``) or whole
        section; validated like the environment is, so a bad value fails here."""
        unknown = sorted(set(flat) - set(FLAT) - set(type(self).model_fields))
        if unknown:
            raise KeyError(f"no such setting {unknown}: flat names as in docs/configuration.md, lower case")
        data = self.model_dump()
        for key, value in flat.items():
            node, path = data, FLAT.get(key, (key,))
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value.model_dump() if isinstance(value, BaseModel) else value
        return type(self).model_validate(data)

    def redacted(self) -> dict[str, object]:
        """Settings safe to log: secrets and URL passwords masked."""
        out = _masked(self.model_dump())
        out["database_url"] = _mask_url_password(self.database_url)
        return out


def _masked(value: Any) -> Any:
    """A dumped settings tree with every secret shown as ``***``."""
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    return "***" if isinstance(value, SecretStr) else value


def field_at(path: tuple[str, ...]) -> FieldInfo:
    """The field of a section key's path (``FLAT``'s values), sub-sections walked."""
    section: type[BaseModel] = SECTIONS[path[0]]
    for part in path[1:-1]:
        section = section.model_fields[part].annotation  # type: ignore[assignment]
    return section.model_fields[path[-1]]


def env_names() -> dict[str, str]:
    """Every documented environment variable and its description (docs/configuration.md)."""
    out = {
        f"SAID_{name.upper()}": info.description or ""
        for name, info in Settings.model_fields.items()
        if name not in SECTIONS
    }
    for flat, path in FLAT.items():
        out[f"SAID_{flat.upper()}"] = field_at(path).description or ""
    return out


def _mask_url_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings`` instead."""
    return Settings()
