"""The one Kafka delivery tracker: a producer's failed deliveries, checked at a flush.

librdkafka reports each delivery through a callback, long after ``produce()`` returned, so
every producer of ours (dataset replay, dead-lettering, DLQ replay) needs the same rule:
collect the errors, flush, and refuse to go on (commit offsets, report success) if any
message failed or is still queued.
"""

from __future__ import annotations

from confluent_kafka import Consumer, Producer, TopicPartition


class DeliveryFailed(RuntimeError):
    """Some produced messages were not acknowledged by the broker."""


class DeliveryTracker:
    """Pass as ``on_delivery``; call ``flush`` where the messages must be safe."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def __call__(self, err, _msg) -> None:
        if err is not None:
            self.failures.append(str(err))

    def flush(self, producer: Producer, timeout_s: float, consequence: str) -> None:
        """Flush ``producer``; raise ``DeliveryFailed`` (saying ``consequence``) if any
        message failed or stayed undelivered. The failure list starts afresh either way."""
        left = producer.flush(timeout_s)
        failures, self.failures = self.failures, []
        if failures or left:
            raise DeliveryFailed(
                f"delivery failed ({len(failures)} failed, {left} undelivered, errors: "
                f"{failures[:3]}); {consequence}"
            )


def produce(producer: Producer, topic: str, **kwargs) -> None:
    """``producer.produce`` that waits for room when the local queue is full (BufferError)
    instead of failing a batch that the broker would accept a moment later."""
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            producer.poll(0.1)


def group_lag(config: dict, group: str, topic: str, timeout_s: float = 5.0) -> int:
    """Messages of ``topic`` the consumer group has not committed yet (all of a partition
    it never committed on). Read without joining the group, so it disturbs no member."""
    consumer = Consumer(config | {"group.id": group, "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=timeout_s)
        lag = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s)
            lag += high - (tp.offset if tp.offset >= 0 else low)
        return lag
    finally:
        consumer.close()
