"""Compatibility module: ``lopt reproduce`` lives in ``lopt.pipeline.reproduce``, its texts in
``lopt.report.findings``."""

from lopt.pipeline.reproduce import *  # noqa: F401,F403
from lopt.pipeline.reproduce import (ADAPTATION_SEEDS, ANALYSIS_COORDINATES, ANALYSIS_PROBLEMS,  # noqa: F401
                                     ANALYSIS_SEEDS, BASELINES, NETWORK_TASKS, TASKS, TUNING_MODES, check_tasks,
                                     compare_task, learned_optimizer, local_candidates, reproduce, reproduce_task,
                                     task_findings, task_for, tuning_mode, write_findings)
from lopt.report.findings import (PAPER, adaptation_text, clipping_text, comparison_markdown,  # noqa: F401
                                  findings_markdown, momentum_text, schedule_text, _num)
