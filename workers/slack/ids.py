"""Block Kit action and block ids shared by the renderer (workers) and the handlers (bot)."""

from enum import StrEnum


class ActionId(StrEnum):
    TERMINATE_CONFIRM = "terminate_confirm"
    TERMINATE_STOP_INSTEAD = "terminate_stop_instead"
    TERMINATE_CANCEL = "terminate_cancel"
    TERMINATE_NO_BACKUP = "terminate_no_backup"
    RESUME_TRAINING = "resume_training"
    WARN_STOP_NOW = "warn_stop_now"
    WARN_SNOOZE = "warn_snooze"
    WARN_KEEP = "warn_keep"
    LAUNCH_CONFIRM = "launch_confirm"
    LAUNCH_CANCEL = "launch_cancel"
    TRAIN_ON_IT = "launch_train_on_it"
    AUTOSTOP_KEEP = "autostop_keep"
    AUTOSTOP_STOP_NOW = "autostop_stop_now"
    FULL_LOG = "run_full_log"
    QUEUE_AFTER = "queue_after_it"
    QUEUE_CANCEL = "queue_cancel"


# Link buttons on a run's message (W&B, MLflow, ...): `run_link_<kind>`. Slack opens the url and
# still sends the click, which bot/actions/logs.py only acks; they need no policy tier.
LINK_ACTION_PREFIX = "run_link_"


class BlockId(StrEnum):
    RUN_HEADER = "run_header"
    RUN_PROGRESS = "run_progress"
    RUN_DETAILS = "run_details"
    TERMINATE_ACTIONS = "terminate_actions"
    RESUME_ACTIONS = "resume_actions"
    WARNING_ACTIONS = "warning_actions"
    LAUNCH_ACTIONS = "launch_actions"
    AUTOSTOP_ACTIONS = "autostop_actions"
    RUN_ACTIONS = "run_actions"
    QUEUE_ACTIONS = "queue_actions"
