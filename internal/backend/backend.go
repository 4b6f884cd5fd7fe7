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
	// New loads engine instance i of m. Instance 0 checks that the
	// backend can serve the model at all, without risking the process (a
	// probe in a child process); later instances may skip that check.
	New func(ctx context.Context, m *modelrepo.Model, opts Options, instance int) (pipeline.Engine, error)
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

// autoOrder is what auto tries, best first: a GPU when there is one
// (TensorRT where its libraries load, else CUDA), else OpenCV, else ONNX
// Runtime on the CPU.
var autoOrder = []string{ORTTensorRT, ORTCUDA, OpenCV, ORTCPU}

// fallback is where a model goes that its backend cannot serve.
const fallback = ORTCPU

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
func Resolve(requested string) (Choice, error) {
	c := Choice{Requested: requested, Backend: requested}
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
	f, ok := factory(requested)
	if !ok {
		return c, fmt.Errorf("unknown backend %q (want one of %v)", requested, Names())
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
func Load(ctx context.Context, requested string, m *modelrepo.Model, opts Options, n int) ([]pipeline.Engine, Choice, error) {
	c, err := Resolve(requested)
	if err != nil {
		return nil, c, fmt.Errorf("model %q: %w", m.Name, err)
	}
	engines, err := load(ctx, c.Backend, m, opts, n)
	if err != nil && c.Backend != fallback && len(engines) == 0 && ctx.Err() == nil {
		c.Reason = fmt.Sprintf("%s cannot serve model %q, falling back to %s: %v", c.Backend, m.Name, fallback, err)
		c.Backend = fallback
		engines, err = load(ctx, fallback, m, opts, n)
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
func load(ctx context.Context, name string, m *modelrepo.Model, opts Options, n int) ([]pipeline.Engine, error) {
	f, ok := factory(name)
	if !ok {
		return nil, fmt.Errorf("unknown backend %q (want one of %v)", name, Names())
	}
	var engines []pipeline.Engine
	for i := range max(n, 1) {
		e, err := f.New(ctx, m, opts, i)
		if err != nil {
			return engines, fmt.Errorf("loading model %q on %s: %w", m.Name, name, err)
		}
		engines = append(engines, e)
	}
	return engines, nil
}
