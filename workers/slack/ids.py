"""Block Kit action and block ids shared by the renderer (workers) and the handlers (bot)."""

from enum import StrEnum


class ActionId(StrEnum):
    TERMINATE_CONFIRM = "terminate_confirm"
    TERMINATE_STOP_INSTEAD = "terminate_stop_instead"
    TERMINATE_CANCEL = "terminate_cancel"
    RESUME_TRAINING = "resume_training"
    WARN_STOP_NOW = "warn_stop_now"
    WARN_SNOOZE = "warn_snooze"
    WARN_KEEP = "warn_keep"


class BlockId(StrEnum):
    RUN_HEADER = "run_header"
    RUN_PROGRESS = "run_progress"
    RUN_DETAILS = "run_details"
    TERMINATE_ACTIONS = "terminate_actions"
    RESUME_ACTIONS = "resume_actions"
    WARNING_ACTIONS = "warning_actions"
