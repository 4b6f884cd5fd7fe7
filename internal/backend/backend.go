// Package backend turns a backend name (auto, ort-cpu, opencv, ort-cuda,
// ort-tensorrt) into engines for a model. Each backend is a registered
// Factory: the CPU ones are registered here, and the GPU ones answer "not
// available" until a GPU build registers real factories under their names
// with Register (the seam pkg/gpu plugs into).
package backend

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// Backend names.
const (
	Auto        = "auto"
	ORTCPU      = "ort-cpu"
	OpenCV      = "opencv"
	ORTCUDA     = "ort-cuda"
	ORTTensorRT = "ort-tensorrt"
)

// Options are what engine constructors may need from the server config.
type Options struct {
	// ORTLib is the ONNX Runtime library; "" finds the default one.
	ORTLib string
	// ORTThreads is ONNX Runtime's intra-op thread count; 0 means one per
	// CPU.
	ORTThreads int
}

// Factory builds the engines of one backend.
type Factory struct {
	// Available reports nil when the backend can run on this machine,
	// else why not. It is called once per model, so it should be cheap.
	Available func() error
	// Check, when set, tells whether the backend can serve model m at
	// all, without risking the process (a probe in a child process). A
	// model that fails it is served on the fallback backend.
	Check func(ctx context.Context, m *modelrepo.Model, opts Options) error
	// New loads one engine instance of m.
	New func(m *modelrepo.Model, opts Options) (pipeline.Engine, error)
}

var (
	mu        sync.Mutex // guards the fields below
	factories = map[string]Factory{}
)

// ErrNotAvailable marks a backend that cannot run on this machine or in
// this build.
var ErrNotAvailable = errors.New("backend not available")

// Register installs the factory of a backend name, replacing any earlier
// one: a GPU build registers ort-cuda and ort-tensorrt over the "not
// available" placeholders.
func Register(name string, f Factory) {
	if name == Auto || name == "" || f.New == nil {
		panic(fmt.Sprintf("backend.Register(%q): bad registration", name))
	}
	mu.Lock()
	defer mu.Unlock()
	factories[name] = f
}

func factory(name string) (Factory, bool) {
	mu.Lock()
	defer mu.Unlock()
	f, ok := factories[name]
	return f, ok
}

// Names lists the backend names a server accepts, auto first.
func Names() []string {
	mu.Lock()
	defer mu.Unlock()
	names := []string{Auto}
	for n := range factories {
		names = append(names, n)
	}
	slices.Sort(names[1:])
	return names
}

// autoOrder is what auto tries, best first: a GPU when there is one, else
// OpenCV, else ONNX Runtime on the CPU.
var autoOrder = []string{ORTCUDA, OpenCV, ORTCPU}

// fallback is where a model goes that its backend cannot serve.
const fallback = ORTCPU

// Choice is the backend picked for one model.
type Choice struct {
	// Backend is the name the engines are built with.
	Backend string
	// Requested is what the server was asked for.
	Requested string
	// Reason says why Backend differs from Requested ("" when it does not):
	// auto's pick, or the failed check that made the model fall back.
	Reason string
}

// Choose picks the backend for model m. auto takes the first available
// backend of its order; a backend whose Check refuses the model falls
// back to ort-cpu. An unknown name, or an unavailable explicitly
// requested backend, is an error.
func Choose(ctx context.Context, requested string, m *modelrepo.Model, opts Options) (Choice, error) {
	c := Choice{Requested: requested}
	name := requested
	if requested == Auto {
		var why []error
		for _, n := range autoOrder {
			f, ok := factory(n)
			if !ok {
				continue
			}
			if f.Available != nil {
				if err := f.Available(); err != nil {
					why = append(why, fmt.Errorf("%s: %w", n, err))
					continue
				}
			}
			name = n
			break
		}
		if name == Auto {
			return c, fmt.Errorf("backend auto: nothing available: %w", errors.Join(why...))
		}
		c.Reason = "auto picked " + name
		if len(why) > 0 {
			c.Reason += " (" + errors.Join(why...).Error() + ")"
		}
	}
	f, ok := factory(name)
	if !ok {
		return c, fmt.Errorf("unknown backend %q (want one of %v)", name, Names())
	}
	if f.Available != nil {
		if err := f.Available(); err != nil {
			return c, fmt.Errorf("backend %s: %w", name, err)
		}
	}
	c.Backend = name
	if f.Check != nil && name != fallback {
		if err := f.Check(ctx, m, opts); err != nil {
			if ctx.Err() != nil {
				return c, ctx.Err()
			}
			c.Backend = fallback
			c.Reason = fmt.Sprintf("%s cannot serve model %q, falling back to %s: %v", name, m.Name, fallback, err)
		}
	}
	return c, nil
}

// New loads one engine instance of m on the named backend (a Choice's
// Backend, never auto).
func New(name string, m *modelrepo.Model, opts Options) (pipeline.Engine, error) {
	f, ok := factory(name)
	if !ok {
		return nil, fmt.Errorf("unknown backend %q (want one of %v)", name, Names())
	}
	if f.Available != nil {
		if err := f.Available(); err != nil {
			return nil, fmt.Errorf("backend %s: %w", name, err)
		}
	}
	e, err := f.New(m, opts)
	if err != nil {
		return nil, fmt.Errorf("loading model %q on %s: %w", m.Name, name, err)
	}
	return e, nil
}
