"""The training code: the git mirror of the training repository (`repo`) and the environments
its scripts run in (`envs`). Below the jobs: nothing here imports `jobs/` or `services`."""
