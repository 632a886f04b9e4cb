"""Progress lines of long steps (medprep.common.progress)."""

from medprep.common.progress import Progress, format_duration, progress_line


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_line_gives_done_total_percent_rate_and_eta():
    assert progress_line("tiles", 12_400, 48_000, 12_400 / 930) == (
        "tiles 12,400/48,000 (26%), 930 tiles/s, ETA 38 s"
    )
    assert progress_line("slices", 3, None, 2.0) == "slices 3, 1.5 slices/s"
    assert "ETA" not in progress_line("tiles", 10, 10, 1.0)


def test_durations_read_naturally():
    assert format_duration(38.4) == "38 s"
    assert format_duration(245) == "4 min 05 s"
    assert format_duration(3720) == "1 h 02 min"


def test_lines_come_at_a_steady_pace_not_per_item():
    clock, lines = FakeClock(), []
    progress = Progress("tiles", 1280, every_s=5, emit=lines.append, clock=clock)
    for _ in range(1280):
        clock.now += 1 / 64  # exact in binary; 20 s in all
        progress.advance()
    assert len(lines) == 4  # at 5, 10, 15 and 20 s
    assert lines[0] == "tiles 320/1,280 (25%), 64 tiles/s, ETA 15 s"
    final = progress.finish()
    assert final == "tiles 1,280/1,280 (100%), 64 tiles/s" and lines[-1] == final
