"""The Kubernetes Agent Sandbox API (sig-apps) and a Python controller for it.

:mod:`.api` is the single definition of groups, kinds, labels and reasons;
:mod:`.crds` the CRDs; :mod:`.objects` pure functions computing desired objects;
:mod:`.controller` the reconcilers (kopf); :mod:`.kube` the JSON client.
"""
