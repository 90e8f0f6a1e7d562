"""The kernel agent: a sandbox's main process, waiting warm for the one controller it obeys.

Sandboxes started ahead of time (a Kubernetes warm pool) cannot know whose
kernel they will run. The agent preloads ipykernel, waits for a controller
holding a pinned key to claim it (:mod:`.protocol`), and then starts,
signals, restarts in place and stops the kernel on that controller's
requests (:mod:`.server`). :mod:`.client` is the controller's side.
"""
