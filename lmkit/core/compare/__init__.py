"""``lmkit compare``: every objective on the same data, trunk, budget and seed, in one table.

The table never lets a bound or a score pass for an exact likelihood: each cell carries its kind
(``=`` exact, ``≤`` upper bound, ``score``) and its standard error where it is estimated. With
several seeds per objective it adds the mean ± sample std across seeds and a one-sided Welch
t-test of each objective's primary metric against a baseline's (:mod:`lmkit.core.stats`).
"""

from __future__ import annotations

from lmkit.core.compare.columns import (  # noqa: F401
    Column,
    metric_columns,
    protocol_conflicts,
    protocol_lines,
    seed_figure_lines,
    seed_figure_rows,
)
from lmkit.core.compare.entry import (  # noqa: F401
    CompareObserver,
    Entry,
    NullCompareObserver,
    metric_names,
)
from lmkit.core.compare.pipeline import (  # noqa: F401
    CompareRequest,
    Comparison,
    add_generation_columns,
    add_pack_columns,
    run_comparison,
)
from lmkit.core.compare.report import (  # noqa: F401
    HEADLINE,
    cell,
    cost_line,
    headline_cells,
    paired_lines,
    paired_rows,
    plot_curves,
    sanity_check,
    to_csv,
    to_json,
    to_markdown,
    write_report,
)
from lmkit.core.compare.seeds import (  # noqa: F401
    FLAGGED_NOTE,
    SEEDS_NOTE,
    TEST_NOTE,
    SeedGroup,
    _kind_words,
    _values,
    baseline_tests,
    budget_basis,
    comparison_budget,
    fmt_mean_std,
    fmt_test,
    label_entries,
    resolve_baseline,
    seed_groups,
    seed_lines,
    seed_summary,
    several_seeds,
    test_statement,
)
from lmkit.core.compare.training import (  # noqa: F401
    CURVE_POINTS,
    REUSABLE_DIFFERENCES,
    _effective_config,
    _evaluated_entry,
    _run_plan,
    check_comparable,
    compare_objectives,
    compare_runs,
    config_difference,
    default_compare_dir,
    ensure_curve,
    eval_option_names,
    eval_options_for,
)
