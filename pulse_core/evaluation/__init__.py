"""Measure restorations against ground truth and baselines: the one evaluation code path.

`pulse eval`, the `evaluate` Prefect flow and `bench/evaluate_modes.py` all run these modules:
`run.evaluate_batch` (ground truth -> LR -> degrade -> the pipeline's restore -> metric rows),
`report.finish_evaluation` (Parquet, summary, markdown, plots, contact sheets) and, without
Prefect, `job.evaluate`. Metrics: `metrics` (LR consistency, PSNR/SSIM, diversity), `niqe` (the
paper's metric, our implementation), `brisque` and `identity` (optional extras), `degrade`
(seeded degradations), `baselines` (nearest, bicubic), `assets` (registry files, sha256-pinned).
"""

from pulse_core.evaluation.job import evaluate
from pulse_core.evaluation.report import EvalSummary, finish_evaluation
from pulse_core.evaluation.run import BatchEval, evaluate_batch, list_ground_truths
from pulse_core.evaluation.settings import EvalSettings

__all__ = [
    "BatchEval",
    "EvalSettings",
    "EvalSummary",
    "evaluate",
    "evaluate_batch",
    "finish_evaluation",
    "list_ground_truths",
]
