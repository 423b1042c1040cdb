"""Demo plots are real PNG files."""

from said.plots import alignment_curve, fresh_vs_reference, freshness


def test_plots_write_png_files(tmp_path):
    paths = [
        alignment_curve(
            [{"pass": i + 1, "loss": v, "token_accuracy": 1 / v} for i, v in enumerate([5.0, 4.0, 3.5])],
            tmp_path / "a.png",
        ),
        fresh_vs_reference([1.0, 2.0, 1.5], [2.5, 3.0], tmp_path / "b.png"),
        freshness([0.8, 1.2, 1.6], tmp_path / "c.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
