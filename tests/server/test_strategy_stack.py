"""The run's composed strategy records every rejection per site, with the reason."""

import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from server.app import compose_config
from server.strategy import build_stack


def _reply(node, w):
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(w))}),
                          "metrics": MetricRecord({"num-examples": 1, "client": node - 1}),
                          "ledger": ConfigRecord({"site": f"client-{node - 1}"})})
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60,
                    message_type="train")
    return make_message(meta, content)


def test_mirror_and_validation_rejections_are_counted_per_site():
    # Prepare: the default stack, told the global model is w = [0, 0]; node 3's privacy
    # report was already rejected by the ledger mirror, node 2 sends NaN, twice.
    cfg, _ = compose_config(["strategy.max_update_norm=10"])
    stack = build_stack(cfg)
    stack.validation._reference = {"w": np.zeros(2)}
    replies = [_reply(1, [1.0, 1.0]), _reply(2, [np.nan, 0.0]), _reply(3, [0.0, 0.0])]
    mirror_rejected = [{"node_id": 3, "reason": "privacy report rejected: steps=4"}]

    for rnd in (1, 2):
        kept, rows = stack.screen(rnd, replies[:2], mirror_rejected, replies)

    assert [m.metadata.src_node_id for m in kept] == [1]
    assert [(r["site"], r["client"], r["check"]) for r in rows] == [
        ("client-2", 2, "privacy_report"), ("client-1", 1, "nonfinite")]
    assert rows[1]["reason"].startswith("update rejected (nonfinite): w: 1 NaN")
    assert stack.rejection_counts() == {"client-1": {"nonfinite": 2},
                                        "client-2": {"privacy_report": 2}}
