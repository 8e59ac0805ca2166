"""A client's privacy state survives rounds (context) and restarts (state-dir)."""

from flwr.app import Context, RecordDict

from clients.state import PrivacyState, load_state, save_state


def _context(node_config):
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def test_fresh_client_has_no_state():
    assert load_state(_context({"partition-id": 0})) is None


def test_state_roundtrips_through_the_context():
    ctx = _context({})
    save_state(ctx, PrivacyState(1.25, [(1.25, 0.25, 8), (1.25, 0.5, 4)]))
    assert load_state(ctx) == PrivacyState(1.25, [(1.25, 0.25, 8), (1.25, 0.5, 4)])


def test_a_restarted_site_resumes_its_spending_from_disk(tmp_path):
    before = _context({"state-dir": str(tmp_path)})
    save_state(before, PrivacyState(2.0, [(2.0, 0.1, 30)]))
    restarted = _context({"state-dir": str(tmp_path)})  # empty context, same folder
    assert load_state(restarted) == PrivacyState(2.0, [(2.0, 0.1, 30)])


def test_the_more_spent_state_wins(tmp_path):
    ctx = _context({"state-dir": str(tmp_path)})
    save_state(ctx, PrivacyState(2.0, [(2.0, 0.1, 30)]))
    # Disk says more was spent (e.g. a crash after the file was written): over-count.
    other = _context({"state-dir": str(tmp_path)})
    save_state(other, PrivacyState(2.0, [(2.0, 0.1, 50)]))
    assert load_state(ctx).total_steps == 50
