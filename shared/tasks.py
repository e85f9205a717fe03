"""Celery task names. The gateway publishes by name and never imports worker code."""

START_COMPARISON = "comparison.start"
RUN_CANDIDATE = "comparison.run_candidate"
FINALIZE_COMPARISON = "comparison.finalize"
LOG_FEEDBACK = "comparison.log_feedback"
