"""A stock consumer of a topic: Confluent's Python client, not the fabric's
code, reads every partition from its beginning up to the end offsets it
finds at start, and prints one JSON line per message:

    {"partition": P, "offset": O, "key": "...", "headers": {...}, "value": "..." | null}

Values and headers are decoded as UTF-8 (the entities topic's JSON format).
Nothing is committed: the group id is new each run.

    python stock_consumer.py BROKERS TOPIC
"""

import json
import sys
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition


def main() -> int:
    brokers, topic = sys.argv[1], sys.argv[2]
    c = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": f"stock-consumer-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    md = c.list_topics(topic, timeout=30)
    t = md.topics.get(topic)
    if t is None or t.error is not None:
        print(f"stock_consumer: no topic {topic}: {t.error if t else 'absent'}", file=sys.stderr)
        return 2
    ends = {}
    for p in sorted(t.partitions):
        _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
        ends[p] = high
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    left = {p for p, end in ends.items() if end > 0}
    out = sys.stdout
    while left:
        m = c.poll(5.0)
        if m is None:
            continue
        if m.error():
            raise KafkaException(m.error())
        p, o = m.partition(), m.offset()
        if p in left and o >= ends[p] - 1:
            left.discard(p)
        if o >= ends[p]:
            continue
        value = m.value()
        out.write(
            json.dumps(
                {
                    "partition": p,
                    "offset": o,
                    "key": (m.key() or b"").decode(),
                    "headers": {k: (v or b"").decode() for k, v in (m.headers() or [])},
                    "value": None if value is None else value.decode(),
                }
            )
            + "\n"
        )
    c.close()
    print(f"stock_consumer: read {topic} to the end offsets {ends}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
