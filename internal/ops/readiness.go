// Package ops is visionserve's operations endpoint: the HTTP server on
// --http-addr that serves Prometheus metrics (/metrics), liveness
// (/healthz) and readiness (/readyz), and the readiness state that drives
// both /readyz and gRPC health checking, so that the two never disagree.
package ops

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// gRPC service names as health checking knows them; "" is the server as a
// whole.
const (
	ServiceVision    = "visionserve.v1.VisionService"
	ServiceInference = "inference.GRPCInferenceService"
)

// HealthServices are the names whose status Readiness sets.
var HealthServices = []string{"", ServiceVision, ServiceInference}

// HealthSetter is the part of grpc's health.Server that Readiness drives.
type HealthSetter interface {
	SetServingStatus(service string, status healthpb.HealthCheckResponse_ServingStatus)
}

type modelState int

const (
	modelLoading modelState = iota
	modelWarm
	modelFailed
)

type model struct {
	state modelState
	err   error
}

// Readiness says whether the server should get traffic: only once every
// expected model is loaded and has run a real warm-up batch, and never
// again once draining began. Every change is pushed to gRPC health
// checking at once; /readyz reads it on each probe. It is safe for
// concurrent use.
type Readiness struct {
	health HealthSetter

	mu       sync.Mutex // guards the fields below
	models   map[string]*model
	draining bool
	serving  bool // what health checking was last told
}

// NewReadiness returns a not-ready state and tells health (which may be
// nil) that every service in HealthServices is NOT_SERVING.
func NewReadiness(health HealthSetter) *Readiness {
	r := &Readiness{health: health, models: map[string]*model{}}
	if health != nil {
		for _, s := range HealthServices {
			health.SetServingStatus(s, healthpb.HealthCheckResponse_NOT_SERVING)
		}
	}
	return r
}

// Expect adds models that must be warm before the server is ready. Call it
// with every model before loading begins; a model added again keeps its
// state.
func (r *Readiness) Expect(models ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, name := range models {
		if _, ok := r.models[name]; !ok {
			r.models[name] = &model{state: modelLoading}
		}
	}
	r.updateLocked()
}

// Warmed records that model is loaded and ran its warm-up batch.
func (r *Readiness) Warmed(name string) {
	r.set(name, modelWarm, nil)
}

// WarmUp runs warm, which should run a real batch through model's
// engines, and records the model as warm when it succeeds or as failed
// when it does not. It returns warm's error.
func (r *Readiness) WarmUp(ctx context.Context, name string, warm func(context.Context) error) error {
	r.Expect(name)
	if err := warm(ctx); err != nil {
		err = fmt.Errorf("warming up model %q: %w", name, err)
		r.Failed(name, err)
		return err
	}
	r.Warmed(name)
	return nil
}

// Failed records that model could not be loaded or warmed up; the server
// stays not ready and says why.
func (r *Readiness) Failed(name string, err error) {
	r.set(name, modelFailed, err)
}

func (r *Readiness) set(name string, state modelState, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.models[name] = &model{state: state, err: err}
	r.updateLocked()
}

// Forget drops model from what readiness waits for: it is no longer
// served (it failed to load or warm up and was removed), so the server
// may be ready without it.
func (r *Readiness) Forget(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.models, name)
	r.updateLocked()
}

// Drain marks the server as shutting down: not ready from now on, for
// good. Call it first thing in shutdown, so load balancers stop sending
// before the server stops accepting.
func (r *Readiness) Drain() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.draining = true
	r.updateLocked()
}

// Ready reports whether the server should get traffic and, when not, a
// short reason fit for a probe's response body.
func (r *Readiness) Ready() (bool, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.readyLocked()
}

func (r *Readiness) readyLocked() (bool, string) {
	if r.draining {
		return false, "draining: shutting down"
	}
	if len(r.models) == 0 {
		return false, "starting: no models registered yet"
	}
	var loading, failed []string
	for name, m := range r.models {
		switch m.state {
		case modelLoading:
			loading = append(loading, name)
		case modelFailed:
			failed = append(failed, fmt.Sprintf("%s (%v)", name, m.err))
		}
	}
	slices.Sort(loading)
	slices.Sort(failed)
	switch {
	case len(failed) > 0:
		return false, "failed: " + strings.Join(failed, "; ")
	case len(loading) > 0:
		return false, fmt.Sprintf("loading: %d of %d models not warmed up: %s",
			len(loading), len(r.models), strings.Join(loading, ", "))
	}
	return true, "ready"
}

// updateLocked tells health checking when readiness changed. It runs with
// r.mu held so that two changes cannot reach health checking out of order.
func (r *Readiness) updateLocked() {
	ready, _ := r.readyLocked()
	if ready == r.serving || r.health == nil {
		r.serving = ready
		return
	}
	r.serving = ready
	status := healthpb.HealthCheckResponse_NOT_SERVING
	if ready {
		status = healthpb.HealthCheckResponse_SERVING
	}
	for _, s := range HealthServices {
		r.health.SetServingStatus(s, status)
	}
}
