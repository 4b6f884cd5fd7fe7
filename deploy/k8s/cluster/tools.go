//go:build tools

// Package tools pins the Kubernetes components scripts/k8s.sh builds, in
// a module of its own so that the server's go.mod stays free of them.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
