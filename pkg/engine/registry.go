package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// Backend names, defined here once; configuration, metrics and the
// engines' own Backend methods all use these.
const (
	Auto        = "auto"
	ORTCPU      = "ort-cpu"
	OpenCV      = "opencv"
	ORTCUDA     = "ort-cuda"
	ORTTensorRT = "ort-tensorrt"
)

// BackendNames lists every backend name a server accepts, auto first.
var BackendNames = []string{Auto, ORTCPU, OpenCV, ORTCUDA, ORTTensorRT}

// autoOrder is what auto tries, best first: a GPU when there is one
// (TensorRT where its libraries load, else CUDA), else OpenCV, else ONNX
// Runtime on the CPU.
var autoOrder = []string{ORTTensorRT, ORTCUDA, OpenCV, ORTCPU}

// fallbackBackend is where a model goes that its backend cannot serve.
const fallbackBackend = ORTCPU

// ErrNotAvailable marks a backend that cannot run on this machine or in
// this build.
var ErrNotAvailable = errors.New("backend not available")

// Factory builds the engines of one backend. What a backend needs besides
// the model (library paths, thread counts, GPU options) is bound into the
// factory when it is made.
type Factory struct {
	// Available reports nil when the backend can run on this machine,
	// else why not. It is called once per model, so it should be cheap.
	// Nil means always available.
	Available func() error
	// New loads engine instance i of m. Instance 0 checks that the
	// backend can serve the model at all, without risking the process (a
	// probe in a child process); later instances may skip that check.
	New func(ctx context.Context, m *modelrepo.Model, instance int) (Engine, error)
}

// Registry maps backend names to factories. It is a plain value, built
// once (in main) and read-only afterwards: nothing registers itself.
type Registry struct {
	factories map[string]Factory
}

// NewRegistry returns a registry of the given factories, by backend name.
// Every name must be one of BackendNames other than Auto.
func NewRegistry(factories map[string]Factory) (*Registry, error) {
	r := &Registry{factories: map[string]Factory{}}
	for name, f := range factories {
		if name == Auto || !slices.Contains(BackendNames, name) || f.New == nil {
			return nil, fmt.Errorf("engine registry: bad factory for backend %q", name)
		}
		r.factories[name] = f
	}
	return r, nil
}

// Unavailable is the factory of a backend this build or machine cannot
// run; why says what is missing.
func Unavailable(why string) Factory {
	err := fmt.Errorf("%w: %s", ErrNotAvailable, why)
	return Factory{
		Available: func() error { return err },
		New:       func(context.Context, *modelrepo.Model, int) (Engine, error) { return nil, err },
	}
}

// Choice is the backend picked for one model.
type Choice struct {
	// Backend is the name the engines were built with.
	Backend string
	// Requested is what the server was asked for.
	Requested string
	// Reason says why Backend differs from Requested ("" when it does not):
	// auto's pick, or the failure that made the model fall back.
	Reason string
}

// Resolve turns a requested name into a backend that can run here: auto
// takes the first available backend of its order. An unknown name, or an
// unavailable explicitly requested backend, is an error.
func (r *Registry) Resolve(requested string) (Choice, error) {
	c := Choice{Requested: requested, Backend: requested}
	if requested == Auto {
		var why []error
		for _, n := range autoOrder {
			f, ok := r.factories[n]
			if !ok {
				continue
			}
			if f.Available != nil {
				if err := f.Available(); err != nil {
					why = append(why, fmt.Errorf("%s: %w", n, err))
					continue
				}
			}
			c.Backend = n
			break
		}
		if c.Backend == Auto {
			return c, fmt.Errorf("backend auto: nothing available: %w", errors.Join(why...))
		}
		c.Reason = "auto picked " + c.Backend
		if len(why) > 0 {
			c.Reason += " (" + errors.Join(why...).Error() + ")"
		}
		return c, nil
	}
	f, ok := r.factories[requested]
	if !ok {
		return c, fmt.Errorf("unknown backend %q (want one of %v)", requested, BackendNames)
	}
	if f.Available != nil {
		if err := f.Available(); err != nil {
			return c, fmt.Errorf("backend %s: %w", requested, err)
		}
	}
	return c, nil
}

// Load builds n engine instances of m on the requested backend. When the
// backend cannot serve the model at all (its first instance fails to
// load, an OpenCV probe child dying on the graph, say), the model falls
// back to ort-cpu and Choice.Reason says why. On error no engine is left
// open.
func (r *Registry) Load(ctx context.Context, requested string, m *modelrepo.Model, n int) ([]Engine, Choice, error) {
	c, err := r.Resolve(requested)
	if err != nil {
		return nil, c, fmt.Errorf("model %q: %w", m.Name, err)
	}
	engines, err := r.load(ctx, c.Backend, m, n)
	if err != nil && c.Backend != fallbackBackend && len(engines) == 0 && ctx.Err() == nil {
		c.Reason = fmt.Sprintf("%s cannot serve model %q, falling back to %s: %v", c.Backend, m.Name, fallbackBackend, err)
		c.Backend = fallbackBackend
		engines, err = r.load(ctx, fallbackBackend, m, n)
	}
	if err != nil {
		for _, e := range engines {
			_ = e.Close()
		}
		return nil, c, err
	}
	return engines, c, nil
}

// load builds n instances on one backend; on error it returns the
// instances already built, for the caller to close.
func (r *Registry) load(ctx context.Context, name string, m *modelrepo.Model, n int) ([]Engine, error) {
	f, ok := r.factories[name]
	if !ok {
		return nil, fmt.Errorf("unknown backend %q (want one of %v)", name, BackendNames)
	}
	var engines []Engine
	for i := range max(n, 1) {
		e, err := f.New(ctx, m, i)
		if err != nil {
			return engines, fmt.Errorf("loading model %q on %s: %w", m.Name, name, err)
		}
		engines = append(engines, e)
	}
	return engines, nil
}
