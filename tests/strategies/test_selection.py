"""Seeded client selection: the same (seed, round, site names) choose the same sites."""

import hashlib

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from strategies.selection import SeededSelection


def _by_hand(seed, rnd, names, k):
    """The k names with the smallest sha256("seed/round/name"), worked out independently."""
    digests = {n: hashlib.sha256(f"{seed}/{rnd}/{n}".encode()).hexdigest() for n in names}
    return sorted(sorted(names, key=digests.get)[:k])


def _select(msgs, nodes, names, seed=7, rnd=1):
    base = FedAvg(fraction_train=0.5, min_train_nodes=1, min_available_nodes=len(nodes))
    selection = SeededSelection(base, seed=seed)
    selection.names = names
    messages = selection.configure_train(rnd, msgs.arrays(w=np.zeros(1)), ConfigRecord({}),
                                         msgs.FakeGrid(nodes))
    return sorted(names[m.metadata.dst_node_id] for m in messages), selection, base


def test_half_of_the_sites_are_chosen_by_the_seeded_hash(msgs, task_identity):
    names = {11: "a", 12: "b", 13: "c", 14: "d", 15: "e", 16: "f"}

    chosen, selection, base = _select(msgs, list(names), names)

    assert chosen == _by_hand(7, 1, names.values(), 3)  # int(6 * 0.5) = 3
    assert selection.selected[1] == chosen  # recorded for metrics.jsonl
    assert (base.fraction_train, base.min_train_nodes, base.min_available_nodes) == (0.5, 1, 6)


def test_other_node_ids_for_the_same_sites_choose_the_same_sites(msgs, task_identity):
    first = {11: "a", 12: "b", 13: "c", 14: "d", 15: "e", 16: "f"}
    again = {91: "d", 92: "e", 93: "f", 94: "a", 95: "b", 96: "c"}  # a rerun: new node ids

    assert _select(msgs, list(first), first)[0] == _select(msgs, list(again), again)[0]
    assert _select(msgs, list(first), first, rnd=2)[0] == _by_hand(7, 2, first.values(), 3)


def test_identify_query_names_each_site(tmp_path):
    # The in-process grid serves the real ClientApp's identify handler (no training).
    from clients.app import app
    from clients.state import STATE_ROOT_KEY
    from server.strategy import identify_sites
    from simulations.inprocess import InProcessGrid, _server_identity

    grid = InProcessGrid(app, 3)

    def send(grid, messages, timeout, what):
        return list(grid.send_and_receive(messages, timeout=timeout))

    with _server_identity():
        names = identify_sites(grid, send, {STATE_ROOT_KEY: str(tmp_path)}, 10.0)

    assert names == {1: "client-0", 2: "client-1", 3: "client-2"}
