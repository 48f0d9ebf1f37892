"""``tread compare``: the dense and the routed arm of one config, side by side.

Both arms share every setting but ``model.routes`` (the dense arm has none), train for the same
number of steps or the same training wall-clock, and are evaluated along the way by the run's
own in-loop metric (same seeds and labels): a pixel run's FD and conditional accuracy in a
packaged classifier's features ("fd", "acc"), a latent run's FD of pooled latents ("fd_latent")
or, with ``eval.feature_net=inception``, FID of its VAE-decoded samples ("fid"), with no
accuracy (see :func:`tread.train.latent_eval.eval_metrics`). Outputs in ``--out``: one run
directory per arm, ``compare.json`` (written first, so a failing plot loses no number; keys in
:func:`summarize`), ``report.md``, ``<metric>.png`` (metric vs training wall-clock | vs steps:
``fd.png`` for pixel runs), ``acc_vs_steps.png`` (pixel runs only) and
``samples_side_by_side.png``. Every setting the final scoring needs is checked before training.

Two different figures, never given one name:

- **training-step speed-up (it/s ratio)**: median it/s of the TREAD arm over the dense arm's,
  beside the cost model's ideal (dense / routed FLOPs);
- **steps-to-quality ratio** and **wall-clock-to-quality ratio**: the dense arm's steps
  (training seconds) to its final FD over the TREAD arm's steps (seconds) to reach that FD.

Seed-noise band: each arm's final EMA model is scored with several sample seeds (disjoint
per-sample seeds, same labels); the band is their spread, reported as mean ± half-range. It
captures the sampling noise of a fixed model (which noise the samples start from), not
training-seed noise (another initialisation or data order would move the curves further). A
conclusion is drawn only when the two arms' seed ranges do not overlap and the run is long
enough (:data:`MIN_EVAL_POINTS` evaluations and :data:`MIN_STEPS` steps per arm); otherwise the
report says "inconclusive" and shows the band.
"""

from .plan import (
    ARMS,
    EVAL_POINTS,
    LOG_ROWS,
    MIN_EVAL_POINTS,
    MIN_RATE_ROWS,
    MIN_STEPS,
    PROBE_MARGIN,
    SEED_STRIDE,
    Intervals,
    arm_configs,
    choose_eval_every,
    choose_log_every,
    expected_steps,
    plan_intervals,
    probe_step_rate,
)
from .report import (
    plot_fd,
    reach_sentence,
    speedup_sentence,
    write_outputs,
    write_report,
)
from .summary import (
    METRIC_LABELS,
    arm_summary,
    conclude,
    eval_points,
    evaluate_final_seeds,
    fmt,
    is_finite_number,
    json_safe,
    metric_label,
    noise_seeds,
    plus_minus,
    summarize,
    summary_metric,
    time_to_reach,
)

__all__ = [
    "ARMS",
    "EVAL_POINTS",
    "Intervals",
    "LOG_ROWS",
    "METRIC_LABELS",
    "MIN_EVAL_POINTS",
    "MIN_RATE_ROWS",
    "MIN_STEPS",
    "PROBE_MARGIN",
    "SEED_STRIDE",
    "arm_configs",
    "arm_summary",
    "choose_eval_every",
    "choose_log_every",
    "conclude",
    "eval_points",
    "evaluate_final_seeds",
    "expected_steps",
    "fmt",
    "is_finite_number",
    "json_safe",
    "metric_label",
    "noise_seeds",
    "plan_intervals",
    "plot_fd",
    "plus_minus",
    "probe_step_rate",
    "reach_sentence",
    "speedup_sentence",
    "summarize",
    "summary_metric",
    "time_to_reach",
    "write_outputs",
    "write_report",
]
