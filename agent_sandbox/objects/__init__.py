"""Pure functions: the objects each kind wants to exist, and the status it should report.

Nothing here talks to the API server; the reconcilers in
:mod:`agent_sandbox.controller` read the world, call these, and write the
difference.
"""
