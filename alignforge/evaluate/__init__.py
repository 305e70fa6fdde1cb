"""Evaluation: tasks whose metric is also the RL reward, multi-system evals, reports, plots.

    from alignforge.evaluate.tasks import get_task           # metric + reward, one definition
    from alignforge.evaluate.runner import run_eval          # systems x test split -> results.json
    from alignforge.evaluate.report import build_report      # run dir -> self-contained HTML
    from alignforge.evaluate.plots import plot_loss_curve    # PNG helpers for training stages
    from alignforge.evaluate.stats import bootstrap_ci, win_tie_loss

Submodules are imported on demand, so ``import alignforge.evaluate`` stays cheap (the CLI needs it).
"""
