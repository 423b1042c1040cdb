"""All configuration, read once from the environment (prefix ``SAID_``).

One place for every key keeps config from spreading over modules; each field says its
type, default and meaning, and pydantic rejects a bad value at start-up with a clear error
instead of failing deep inside a consumer.
"""

from __future__ import annotations

from dataclasses import field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The scorer variants ``said evaluate`` compares (training.evaluate builds each one).
Variant = Literal["id", "text", "said", "said+text", "prompt", "hybrid", "said-init"]


class Settings(BaseSettings):
    """Typed settings; ``SAID_<FIELD>`` in the environment overrides each default."""

    model_config = SettingsConfigDict(env_prefix="SAID_", extra="ignore")

    # --- storage -------------------------------------------------------------------
    database_url: str = Field("sqlite:///./said.db", description="SQLAlchemy URL of the catalogue.")
    data_dir: Path = Field(Path("./said-data"), description="Snapshots, weights, LLM cache.")

    # --- kafka ---------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT|SSL|SASL_SSL|...")
    kafka_sasl_mechanism: str | None = Field(None, description="e.g. PLAIN, SCRAM-SHA-512.")
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (no default).")
    kafka_ssl_ca_location: str | None = Field(None, description="CA bundle for broker TLS.")
    kafka_ssl_certificate_location: str | None = Field(None, description="Client cert (mTLS).")
    kafka_ssl_key_location: str | None = Field(None, description="Client key (mTLS).")
    kafka_ssl_key_password: SecretStr | None = Field(None, description="Client key password.")
    kafka_topic_partitions: int = Field(
        4, ge=1, description="Partitions of topics `said topics create` makes."
    )
    kafka_replication_factor: int = Field(
        1, ge=1, description="Replicas of each topic it makes (production: 3)."
    )
    kafka_min_insync_replicas: int = Field(
        1, ge=1, description="Topic min.insync.replicas it sets (production: 2; acks=all writes need them)."
    )
    group_id: str = Field("said", description="Consumer-group prefix; '.items' etc. appended.")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Kafka group session timeout.")
    consume_batch: int = Field(5000, ge=1, le=100_000, description="Messages per consume batch.")
    consumer_audit_log: Path | None = Field(
        None,
        description="Append `topic partition offset` of each processed message (re-deliveries audit).",
    )
    max_message_bytes: int = Field(
        64_000, ge=256, le=900_000, description="Larger messages go to the DLQ, cut to this many bytes."
    )
    max_future_skew_s: float = Field(
        3600.0, gt=0, description="Events stamped further ahead of now go to the DLQ (future_time)."
    )
    dlq_max_attempts: int = Field(
        5, ge=1, description="`said dlq replay` leaves messages dead-lettered this often."
    )
    park_max_age_s: float = Field(
        86_400.0, gt=0, description="Parked interactions whose item never came go to the DLQ after."
    )
    max_text_chars: int = Field(2000, ge=16, description="Longest accepted title+description.")
    db_retry_max_s: float = Field(30.0, gt=0, description="Cap of the DB-outage backoff.")

    # --- model ---------------------------------------------------------------------
    llm: str | None = Field(None, description="Local HF folder or .gguf; default SmolLM2 GGUF.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Torch device choice.")
    soft_tokens: int = Field(4, ge=1, le=16, description="k soft tokens per item.")
    item_dim: int = Field(128, ge=8, description="Width of the item ID embedding rows.")
    prompt: str = Field(" Item text:", description="Fixed prompt between soft tokens and text.")
    lora_rank: int = Field(0, ge=0, le=256, description="LoRA rank trained with the aligner; 0 = frozen LLM.")

    # --- alignment (`said align`, `said evaluate`) ------------------------------------
    align_epochs: int = Field(24, ge=1, description="Most passes over all items.")
    align_batch: int = Field(16, ge=1, description="Items per alignment step.")
    align_lr_rows: float = Field(0.3, gt=0, description="Rate of the item rows (one step a pass).")
    align_lr_proj: float = Field(1e-2, gt=0, description="Projector rate at batch 16 (sqrt-scaled).")
    align_row_optimizer: str = Field("adagrad", description="rowadam, adagrad or sparseadam.")
    align_lr_final: float = Field(0.1, gt=0, le=1, description="Cosine decay of the rates to this.")
    align_warmup: float = Field(0.05, ge=0, lt=1, description="Projector warm-up, share of the run.")
    align_acc_bar: float = Field(1.0, gt=0, le=1.01, description="Token accuracy that ends an item.")
    align_recheck_every: int = Field(3, ge=1, description="Passes between re-checks of done items.")
    align_checkpoint_every_s: float = Field(120.0, gt=0, description="Mid-pass checkpoint period.")
    align_seed: int = Field(0, description="Seed of the alignment.")
    fidelity_exact_items: int = Field(
        512, ge=1, description="Items greedily decoded to measure exact rebuild."
    )
    reference_items: int = Field(
        16, ge=1, description="Catalogue items put through the fresh path as reference."
    )

    # --- streaming worker (`said update`) --------------------------------------------
    worker_batch: int = Field(16, ge=1, description="Items leased per micro-batch.")
    worker_lease_ttl_s: float = Field(600.0, gt=0, description="A crashed worker's items return after.")
    worker_id: str | None = Field(
        None,
        min_length=1,
        description="Lease owner id, unique per worker and stable across its restarts; unset = host-pid.",
    )
    worker_version_check_s: float = Field(
        5.0, gt=0, description="How often the worker checks for a newly activated aligner."
    )
    refine_epochs: int = Field(100, ge=1, description="Most refinement passes over a micro-batch.")
    refine_lr: float = Field(0.3, gt=0, description="Rate of the fresh rows.")
    refine_target_accuracy: float | None = Field(
        None, gt=0, le=1.01, description="Token accuracy fresh rows are refined to; unset = the catalogue's."
    )

    # --- scorer and retraining ------------------------------------------------------
    retrain_min_interactions: int = Field(10_000, ge=1, description="New interactions -> retrain.")
    retrain_min_items: int = Field(500, ge=1, description="New items -> scorer retrain.")
    retrain_epochs: int = Field(30, ge=1, description="Most epochs per retrain (early stopping).")
    retrain_valid_users: int = Field(2000, ge=1, description="Validation slice of a retrain.")
    retrain_poll_s: float = Field(30.0, gt=0, description="How often the retrainer checks counts.")
    scorer_epochs: int = Field(200, ge=1, description="Most SASRec epochs (early stopping).")
    scorer_batch: int = Field(256, ge=1, description="Users per SASRec step.")
    scorer_lr: float = Field(1e-3, gt=0, description="SASRec Adam rate.")
    scorer_patience: int = Field(8, ge=1, description="Validations without gain before stopping.")
    scorer_eval_every: int = Field(2, ge=1, description="Epochs between validations.")
    scorer_length_batches: bool = Field(
        False, description="Batch users of similar history length: 3x faster on CPU, a little worse."
    )
    evaluate_variant: Variant = Field(
        "said-init", description="Variant `said evaluate` compares with id by default (best on validation)."
    )
    hnsw_min_items: int = Field(50_000, ge=1, description="Index size from which HNSW replaces exact search.")
    snapshot_every_s: float = Field(300.0, gt=0, description="Scorer's index snapshot period (seconds).")
    api_port: int = Field(8000, ge=1, le=65535, description="Port of `said serve` and the demo's API.")
    demo_items: int = Field(200, ge=10, description="Size of the demo's item slice.")
    demo_align_epochs: int = Field(16, ge=1, description="Most alignment passes in the demo.")
    demo_align_batch: int = Field(
        8, ge=1, description="Alignment batch of the demo (more projector steps a pass)."
    )
    demo_fresh: int = Field(5, ge=1, description="Brand-new items the demo publishes.")
    api_token: SecretStr | None = Field(
        None, description="Bearer token of /recommend and /items; required off loopback. Never empty."
    )

    # --- observability -------------------------------------------------------------
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port; 0 = off.")
    log_level: str = Field("INFO", description="Python logging level.")

    def kafka_config(self) -> dict[str, str]:
        """librdkafka settings shared by producers and consumers, security passed through."""
        conf = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
        }
        optional = {
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "sasl.password": (
                self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None
            ),
            "ssl.ca.location": self.kafka_ssl_ca_location,
            "ssl.certificate.location": self.kafka_ssl_certificate_location,
            "ssl.key.location": self.kafka_ssl_key_location,
            "ssl.key.password": (
                self.kafka_ssl_key_password.get_secret_value() if self.kafka_ssl_key_password else None
            ),
        }
        conf.update({k: v for k, v in optional.items() if v is not None})
        return conf

    @field_validator("api_token")
    @classmethod
    def _token_not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        # SAID_API_TOKEN="" must not mean "no auth": a typo in a deployment fails closed.
        if v is not None and not v.get_secret_value().strip():
            raise ValueError("SAID_API_TOKEN is empty: unset it (loopback only) or set a real token")
        if v is not None and v.get_secret_value() != v.get_secret_value().strip():
            raise ValueError("SAID_API_TOKEN has surrounding whitespace, which no client can send")
        return v

    def redacted(self) -> dict[str, object]:
        """Settings safe to log: secrets and URL passwords are masked."""
        out = self.model_dump()
        out["database_url"] = _mask_url_password(self.database_url)
        out["kafka_sasl_password"] = "***" if self.kafka_sasl_password else None
        for key in ("api_token", "kafka_ssl_key_password"):
            out[key] = "***" if getattr(self, key) else None
        return out


def _mask_url_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


# The defaults alone (no environment): what dataclass configs fall back to, so that every
# default is written once, here.
DEFAULTS = Settings.model_construct()
T = TypeVar("T")


def setting(key: str) -> Any:
    """A dataclass field whose default (and meaning, and environment variable) is the
    ``Settings`` field ``key``; ``from_settings`` fills it from a ``Settings``."""
    return field(default=getattr(DEFAULTS, key), metadata={"setting": key})


def from_settings(cls: type[T], settings: Settings, **overrides: Any) -> T:
    """An instance of the dataclass ``cls`` with every ``setting(...)`` field read from
    ``settings`` (so from the environment), then ``overrides`` (CLI flags, tests)."""
    values = {
        f.name: getattr(settings, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata
    }
    return cls(**(values | overrides))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests build their own ``Settings`` instead."""
    return Settings()
