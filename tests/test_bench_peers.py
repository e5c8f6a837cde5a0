"""bench/peers.py: how a run's step ends become its figures, plora's batch for TRL's tokens a step, and
that absent peers are skipped with a note (the peers themselves are never needed by the tests)."""

from __future__ import annotations

import pytest

from bench import peers


def test_measure_leaves_out_warmup_and_pairs_each_step_with_its_batch() -> None:
    # Step ends at 0, 1, 3, 6, 10 s: steps 2..5 last 1, 2, 3, 4 s; with one warmup step left out
    # the measured steps last 2, 3, 4 s and carry the batches of 20, 30, 40 tokens.
    run = peers.measure([0.0, 1.0, 3.0, 6.0, 10.0], [5, 10, 20, 30, 40], warmup=1)
    assert run.step_s == 3.0
    assert run.tokens_per_step == 30.0
    assert run.rate == pytest.approx(90 / 9)


def test_measure_refuses_too_few_steps() -> None:
    with pytest.raises(RuntimeError, match="too few steps"):
        peers.measure([0.0, 1.0], [5, 10], warmup=1)


def test_equal_batch_matches_the_peers_real_tokens_a_step() -> None:
    trl = [peers.Run(1.0, tokens, 1.0) for tokens in (4000.0, 4100.0, 9000.0)]
    assert peers.equal_batch({peers.TRL: trl}, row_tokens=580.0) == 7  # median 4100 / 580 = 7.07
    assert peers.equal_batch({peers.TRL: trl}, row_tokens=1e6) == 1


def test_absent_peers_are_skipped_with_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    peers.main([])
    out = capsys.readouterr().out
    assert "note: --origin not given" in out and "note: --trl-python not given" in out
