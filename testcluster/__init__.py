"""Test support, not shipped: a real Kubernetes API on loopback and a stand-in node agent.

``cluster.TestCluster`` runs etcd, kube-apiserver and kube-controller-manager
(built by ``scripts/build-test-cluster``); ``node_agent`` plays the kubelet,
running each pod's command as a local process in a local sandbox.
"""
