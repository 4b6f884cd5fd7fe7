package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// Input is one image of a request, in exactly one of three forms.
type Input struct {
	// Encoded holds image file bytes (JPEG, PNG, WebP, BMP).
	Encoded []byte
	// Pixels holds an RGB image of Height×Width×3 bytes, to be resized
	// and normalised like a decoded one.
	Pixels        []byte
	Height, Width int
	// Tensor holds a preprocessed model input, 3×H×W floats at the
	// model's input size; it reaches the engine unchanged.
	Tensor []float32
}

// Runner serves one model: it prepares images, queues them for the
// model's batcher and decodes the outputs. Implementations are safe for
// concurrent use. Errors wrap the pipeline's sentinels (batcher.ErrQueueFull,
// batcher.ErrBatcherClosed, the input errors) so that the gRPC edge maps
// them deliberately.
type Runner interface {
	// Infer runs every input and returns one result per input, in order.
	Infer(ctx context.Context, inputs []Input, opts pipeline.Options) ([]pipeline.Result, error)
	// InferRaw runs every input and returns the model's raw outputs for
	// them, batch dimension len(inputs), in the model's output order. The
	// tensors belong to the caller.
	InferRaw(ctx context.Context, inputs []Input) ([]engine.Tensor, error)
	// Backend names what runs the model.
	Backend() string
	// Close finishes every accepted request, then frees the engines. New
	// requests are refused from the moment it is called.
	Close(ctx context.Context) error
}

// Model is one served model: its validated config and its runner.
type Model struct {
	*modelrepo.Model
	Runner Runner
	// LoadTime and WarmupTime are how long loading and the warm-up batch
	// took (for metrics); WarmupTime is set before the model turns ready.
	LoadTime, WarmupTime time.Duration
	ready                atomic.Bool
}

// Ready reports whether the model has warmed up and takes requests.
func (m *Model) Ready() bool { return m.ready.Load() }

// SetReady marks the model ready or not.
func (m *Model) SetReady(ok bool) { m.ready.Store(ok) }

// Registry holds the served models by name. Models are added while the
// server starts and only read afterwards.
type Registry struct {
	mu     sync.RWMutex // guards the fields below
	models map[string]*Model
	closed bool
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{models: map[string]*Model{}} }

// Add serves a model; its name must be valid and not yet taken.
func (r *Registry) Add(m *Model) error {
	if !modelrepo.ValidName(m.Name) {
		return fmt.Errorf("invalid model name %q", m.Name)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return fmt.Errorf("adding model %q: registry closed", m.Name)
	}
	if _, dup := r.models[m.Name]; dup {
		return fmt.Errorf("model %q added twice", m.Name)
	}
	r.models[m.Name] = m
	return nil
}

// Remove stops serving a model and closes its runner.
func (r *Registry) Remove(ctx context.Context, name string) error {
	r.mu.Lock()
	m, ok := r.models[name]
	delete(r.models, name)
	r.mu.Unlock()
	if !ok {
		return fmt.Errorf("model %q not served", name)
	}
	m.SetReady(false)
	return m.Runner.Close(ctx)
}

// Get returns the named model. The name is checked with
// modelrepo.ValidName first, so no request text is ever used as a path.
func (r *Registry) Get(name string) (*Model, bool) {
	if !modelrepo.ValidName(name) {
		return nil, false
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	m, ok := r.models[name]
	return m, ok
}

// Models returns the models sorted by name.
func (r *Registry) Models() []*Model {
	r.mu.RLock()
	defer r.mu.RUnlock()
	ms := make([]*Model, 0, len(r.models))
	for _, m := range r.models {
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b *Model) int { return strings.Compare(a.Name, b.Name) })
	return ms
}

// Ready reports whether there is at least one model and all are ready.
func (r *Registry) Ready() bool {
	ms := r.Models()
	if len(ms) == 0 {
		return false
	}
	for _, m := range ms {
		if !m.Ready() {
			return false
		}
	}
	return true
}

// Close marks every model not ready, then closes the runners in
// parallel: each finishes the requests it accepted before freeing its
// engines. It returns when all are closed.
func (r *Registry) Close(ctx context.Context) error {
	r.mu.Lock()
	r.closed = true
	ms := make([]*Model, 0, len(r.models))
	for _, m := range r.models {
		ms = append(ms, m)
	}
	r.mu.Unlock()
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		m.SetReady(false)
		wg.Go(func() {
			if err := m.Runner.Close(ctx); err != nil {
				errs[i] = fmt.Errorf("closing model %q: %w", m.Name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
