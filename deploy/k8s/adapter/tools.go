//go:build tools

// Package tools pins prometheus-adapter, which scripts/k8s.sh builds for
// the HPA test (the custom and resource metrics APIs, from Prometheus), in
// a module of its own: it needs k8s.io v0.30, deploy/k8s/cluster v0.34.
package tools

import _ "sigs.k8s.io/prometheus-adapter/cmd/adapter"
