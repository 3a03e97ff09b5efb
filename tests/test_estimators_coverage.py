"""Coverage of the masked metrics' stderr on real (weakly trained, tiny) models: slow.

Over 40 seeds, ±2 stderr must cover a high-precision value at least 90 % of the time, for
``nelbo_mc`` (both estimators) of a tiny MDLM and a tiny maskrecon model and for maskrecon's
``recon_score``. ``python -m lmkit.core.bench.coverage`` prints the same table.
"""

from __future__ import annotations

import pytest

from lmkit.core.bench.coverage import (
    coverage_run,
    format_paired,
    format_rows,
    paired_coverage,
    train_tiny,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("objective", ["mdlm", "maskrecon"])
def test_two_stderr_intervals_cover_the_reference(objective, tiny_data, tmp_path):
    run_dir = train_tiny(tiny_data, tmp_path, objective, steps=40)
    result = coverage_run(run_dir, seeds=40, max_tokens=4096, reference_samples=128,
                          device="cpu")
    print(format_rows(result))
    names = {r["metric"] for r in result["rows"]}
    assert {"nelbo_mc (any_order)", "nelbo_mc (time)"} <= names
    assert ("recon_score" in names) == (objective == "maskrecon")
    for row in result["rows"]:
        assert row["seeds"] == 40
        assert row["coverage"] >= 0.9, row
        assert 0.6 < row["spread_over_stderr"] < 1.4, row  # the stderr is the real spread
        assert row["reference_stderr_bpb"] < 0.5 * row["rms_stderr_bpb"], row


def test_the_paired_stderr_of_a_difference_covers_the_reference(tiny_data, tmp_path):
    """Two runs scored with the same draws: ±2 paired stderr covers the precise difference,
    while the independent stderr overstates its spread."""
    a = train_tiny(tiny_data, tmp_path, "mdlm", steps=40)
    b = train_tiny(tiny_data, tmp_path, "maskrecon", steps=40)
    result = paired_coverage(a, b, seeds=40, max_tokens=4096, reference_samples=128,
                             device="cpu")
    print(format_paired(result))
    paired, independent = result["rows"]
    assert paired["coverage"] >= 0.9, paired
    assert 0.6 < paired["spread_over_stderr"] < 1.4, paired
    assert independent["spread_over_stderr"] < 0.8 * paired["spread_over_stderr"], independent
