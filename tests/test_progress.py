"""Progress lines and the per-round lines added to a Flower run's log."""

import io

from runners.progress import Progress, RoundLines, duration, estimate


def test_durations_and_estimates_read_like_a_clock():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]
    assert estimate(10.0, 1, 4) == "elapsed 10 s, about 30 s left"
    assert estimate(10.0, 0, 4) == "elapsed 10 s" and estimate(40.0, 4, 4) == "elapsed 40 s"


def test_off_a_terminal_only_the_lines_print():
    out = io.StringIO()
    with Progress(10, label="training", stream=out) as p:
        assert not p.bar
        for _ in range(5):
            p.advance()
        p.line("epoch 1/2: loss 3.0")
    text = out.getvalue()
    assert text.startswith("epoch 1/2: loss 3.0 [elapsed 0 s") and text.count("\n") == 1


def test_a_bar_on_a_terminal_keeps_the_lines():
    out = io.StringIO()
    with Progress(4, label="training", stream=out, bar=True) as p:
        p.advance(2)
        p.line("epoch 1/2")
    assert "epoch 1/2 [elapsed 0 s" in out.getvalue()


def test_round_lines_follow_the_server_log():
    out = io.StringIO()
    stream = RoundLines(out, num_rounds=3)
    stream.write("INFO :      [ROUND 1/3]\n")
    stream.write("INFO :      round 0: CIDEr-D 0.0 BLEU-4 0.0 loss 4.0\nINFO :      round 1: CIDEr-")
    stream.write("D 0.1 BLEU-4 0.1 loss 3.0\n")
    stream.write("INFO :      round 3: CIDEr-D 0.2 BLEU-4 0.1 loss 2.0\n")
    lines = out.getvalue().splitlines()
    assert lines[0] == "INFO :      [ROUND 1/3]" and lines[2].startswith("[fedcap] initial model evaluated [elapsed")
    assert lines[4].startswith("[fedcap] round 1/3 done [elapsed 0 s, about 0 s left]")
    assert lines[6].startswith("[fedcap] round 3/3 done [elapsed 0 s]")


def test_an_expected_failure_shows_its_message_not_a_traceback():
    """Issue 23 (7): every site out of budget ends with a clear message, no Python traceback; an
    unexpected crash still shows its whole traceback."""
    import io

    from runners.progress import RoundLines

    out = io.StringIO()
    lines = RoundLines(out, num_rounds=2)
    lines.write("ERROR :     ServerApp raised an exception\nTraceback (most recent call last):\n"
                '  File "server_app.py", line 9, in main\n    raise RunFailed(...)\n'
                "server.server_app.RunFailed: round 1: 0 site(s) trained (site-0 refused: privacy budget "
                "exhausted)\nnext line\n")
    lines.write("Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'boom'\n")
    lines.close()
    text = out.getvalue()
    assert "[fedcap] run failed: round 1: 0 site(s) trained (site-0 refused: privacy budget exhausted)" in text
    assert text.count("Traceback") == 1 and "KeyError: 'boom'" in text and "next line" in text
