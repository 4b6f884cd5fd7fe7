package model

import (
	"context"
	"sync"
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
// concurrent use. Errors wrap the pipeline's and batcher's sentinels
// (batcher.ErrQueueFull, batcher.ErrBatcherClosed, the input errors) so
// that a protocol edge maps them deliberately.
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

// State is where a model is in its life.
type State int

// The states of a model, in the order a model normally passes them.
const (
	// Loading: the engines load, or the model warms up.
	Loading State = iota
	// Ready: the model takes requests.
	Ready
	// Unavailable: the model could not be loaded or warmed up; Err says
	// why. It takes no requests, and its engines are freed.
	Unavailable
	// Unloading: the model takes no new requests and finishes the ones
	// it accepted, then frees its engines.
	Unloading
)

// States lists every state, for metrics.
var States = []State{Loading, Ready, Unavailable, Unloading}

// String is the state's name as Triton's repository index spells it.
func (s State) String() string {
	switch s {
	case Loading:
		return "LOADING"
	case Ready:
		return "READY"
	case Unavailable:
		return "UNAVAILABLE"
	case Unloading:
		return "UNLOADING"
	}
	return "UNKNOWN"
}

// Model is one model known to the server: its validated config, its
// runner once loaded, and its state.
type Model struct {
	*modelrepo.Model
	// Runner serves the model's requests; nil until its engines loaded,
	// and for a model that could not be loaded.
	Runner Runner
	// LoadTime and WarmupTime are how long loading and the warm-up batch
	// took (for metrics); WarmupTime is set before the model turns ready.
	LoadTime, WarmupTime time.Duration

	mu    sync.Mutex // guards the fields below
	state State
	err   error
	reg   *Registry // told of every state change; nil until added
	// holds counts the requests using the model (Registry.Acquire);
	// once retired no new one may hold it, and idle is closed when the
	// last one leaves.
	holds   int
	retired bool
	idle    chan struct{}
}

// hold counts one more request using m, unless m was retired.
func (m *Model) hold() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.retired {
		return false
	}
	m.holds++
	return true
}

// Release ends a hold taken by Registry.Acquire.
func (m *Model) Release() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.holds--
	if m.holds == 0 && m.idle != nil {
		close(m.idle)
		m.idle = nil
	}
}

// retire stops m from being held and waits until the requests holding
// it have released it, or ctx ends.
func (m *Model) retire(ctx context.Context) error {
	m.mu.Lock()
	m.retired = true
	if m.holds == 0 {
		m.mu.Unlock()
		return nil
	}
	if m.idle == nil {
		m.idle = make(chan struct{})
	}
	idle := m.idle
	m.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// New returns a model in state Loading, served by r (nil until loaded).
func New(m *modelrepo.Model, r Runner) *Model { return &Model{Model: m, Runner: r} }

// State is the model's state and, when Unavailable, the reason.
func (m *Model) State() (State, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.state, m.err
}

// Ready reports whether the model takes requests.
func (m *Model) Ready() bool {
	s, _ := m.State()
	return s == Ready
}

// SetState moves the model to s; err is the reason when s is
// Unavailable. The registry holding the model re-evaluates readiness.
func (m *Model) SetState(s State, err error) {
	m.mu.Lock()
	m.state, m.err = s, err
	if s != Unavailable {
		m.err = nil
	}
	reg := m.reg
	m.mu.Unlock()
	if reg != nil {
		reg.changed(m, s, err)
	}
}
