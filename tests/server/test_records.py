"""Round records written once their central evaluation's metrics (computed beside the
next round) are done, with the rest of a round's bookkeeping deferred until the next
round's messages are out.

``_Records`` with a recording run directory and reporter (units), then the real
in-process loop: the last record's central metrics are those of the saved model.
"""

import json
import threading

import numpy as np
import pytest

from server.loop import _Outcome, _Records


class _Sink:
    """Stands in for the RunDir and the RoundReporter: keeps what reaches them."""

    def __init__(self):
        self.written, self.reported = [], []

    def append_round(self, record):
        self.written.append(json.loads(json.dumps(record)))

    def round_done(self, record, eps_max):
        self.reported.append((record["round"], eps_max))


def _record(rnd):
    return {"round": rnd, "central": None, "clients": [], "wall_seconds": None}


def test_a_record_is_written_once_its_evaluation_is_done_with_the_time_to_the_next_round():
    sink, outcome = _Sink(), _Outcome()
    release, threads = threading.Event(), []

    def evaluate(rnd):
        threads.append(threading.current_thread().name)
        assert release.wait(timeout=10), "the evaluation was never released"
        return {"accuracy": rnd / 10}

    with _Records(sink, sink, outcome) as records:
        first = records.evaluate(evaluate, 1)
        # The caller goes on while the evaluation blocks: it releases it itself.
        assert not first.done()
        records.hold(_record(1), 0.5, first, 100.0, 103.5)
        records.write(wait=False)
        assert sink.written == []  # still evaluating: held, not written
        release.set()
        first.result(timeout=10)
        records.write(wait=False)
        assert [r["round"] for r in sink.written] == [1]
        assert sink.written[0]["central"] == {"accuracy": 0.1}
        assert sink.written[0]["wall_seconds"] == pytest.approx(3.5)  # start to next start
        assert outcome.rounds_completed == 1
        records.hold(_record(2), 0.7, records.evaluate(evaluate, 2), 103.5, None)
    assert [r["round"] for r in sink.written] == [1, 2]
    assert sink.written[1]["central"] == {"accuracy": 0.2}
    assert sink.written[1]["wall_seconds"] > 0  # the last round: to the end of its evaluation
    assert sink.reported == [(1, 0.5), (2, 0.7)]
    assert records.central == {"accuracy": 0.2} and outcome.rounds_completed == 2
    assert threading.current_thread().name not in threads


def test_at_most_one_evaluation_is_in_flight():
    # A slow evaluation holds the next one back (and so the loop) instead of piling up.
    sink, outcome = _Sink(), _Outcome()
    release = threading.Event()
    threading.Timer(0.3, release.set).start()
    with _Records(sink, sink, outcome) as records:
        first = records.evaluate(lambda: release.wait(timeout=10) and {"accuracy": 0.1})
        second = records.evaluate(lambda: {"accuracy": 0.2})
        assert first.done() and release.is_set()  # evaluate() waited for the first
        assert second.result(timeout=10) == {"accuracy": 0.2}


def test_holding_a_record_writes_the_one_held_before_in_round_order():
    sink, outcome = _Sink(), _Outcome()
    with _Records(sink, sink, outcome) as records:
        slow = records.evaluate(lambda: threading.Event().wait(0.2) or {"accuracy": 0.1})
        records.hold(_record(1), 0.1, slow, 0.0, 1.0)
        records.hold(_record(2), 0.2, records.evaluate(lambda: {"accuracy": 0.2}), 1.0, 2.0)
        assert [r["round"] for r in sink.written] == [1]  # waited for round 1's evaluation
    assert [(r["round"], r["central"]["accuracy"]) for r in sink.written] == [(1, 0.1), (2, 0.2)]


def test_deferred_bookkeeping_runs_once_with_the_next_rounds_start_or_at_the_end():
    sink, outcome = _Sink(), _Outcome()
    runs = []
    with _Records(sink, sink, outcome) as records:
        records.defer(runs.append)
        records.catch_up(7.0)
        records.catch_up(8.0)  # nothing left to run
        records.defer(runs.append)
        records.defer(runs.append)  # a second defer first runs the one before (no next round)
        assert runs == [7.0, None]
    assert runs == [7.0, None, None]  # the last one, when the loop ends


def test_a_held_record_and_deferred_bookkeeping_are_written_when_the_loop_raises():
    sink, outcome = _Sink(), _Outcome()
    with pytest.raises(RuntimeError, match="round 3 failed"):
        with _Records(sink, sink, outcome) as records:
            records.hold(_record(1), 0.1, records.evaluate(lambda: {"accuracy": 0.9}), 0.0, 1.0)
            records.defer(lambda t_next: records.hold(_record(2), 0.2, None, 1.0, t_next))
            raise RuntimeError("round 3 failed")
    assert [(r["round"], r["central"]) for r in sink.written] == [(1, {"accuracy": 0.9}),
                                                                 (2, {})]
    assert outcome.rounds_completed == 2


def test_a_failed_evaluation_is_raised_not_written():
    sink, outcome = _Sink(), _Outcome()

    def broken():
        raise ValueError("bad test set")

    with pytest.raises(ValueError, match="bad test set"):
        with _Records(sink, sink, outcome) as records:
            records.hold(_record(1), 0.1, records.evaluate(broken), 0.0, None)
    assert sink.written == [] and outcome.rounds_completed == 0


def test_a_round_without_a_test_set_is_written_with_empty_central_metrics():
    sink, outcome = _Sink(), _Outcome()
    with _Records(sink, sink, outcome) as records:
        records.hold(_record(1), 0.0, None, 0.0, None)
    assert sink.written[0]["central"] == {} and sink.written[0]["wall_seconds"] >= 0


@pytest.mark.slow
def test_each_rounds_central_metrics_are_its_own_models(tmp_path):
    # Three rounds, no server EMA: each record's central metrics must be those of the
    # model aggregated in that round, not the round before (the evaluation runs late).
    # The final model is saved: evaluate it here and compare with the last record;
    # and the rounds' metrics must differ (else an off-by-one could not show).
    import torch
    from safetensors.torch import load_file

    from clients.models import build_model
    from clients.sitedata import input_shape_of, server_test_data
    from clients.train import predict
    from server.app import compose_config
    from server.evaluation import classification_metrics
    from simulations.inprocess import run_in_process

    path = tmp_path / "run"
    cfg, resolved = compose_config(["train.rounds=3", "simulation.num_clients=2",
                                    "strategy.ema=0", "privacy.accountant=rdp",
                                    "output.progress=false"])
    summary = run_in_process(cfg, path, resolved)
    rounds = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]

    shape, num_classes = input_shape_of(cfg.dataset)
    model = build_model(cfg.model, shape, num_classes, seed=cfg.train.seed)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    test = server_test_data(cfg.dataset, cfg.train.seed)
    expected = classification_metrics(test.y, predict(model, test, torch.device("cpu")))

    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["central"]["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    assert rounds[-1]["central"]["confusion_matrix"] == expected["confusion_matrix"]
    assert summary["accuracy"] == expected["accuracy"]
    losses = [r["central"]["loss"] for r in rounds]
    assert len(set(np.round(losses, 9))) == 3
    assert all(r["wall_seconds"] > 0 for r in rounds)
