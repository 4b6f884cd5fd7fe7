package model

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// Observer is told every model's state changes and removals, in order
// (metrics, logs). Its methods must not call back into the registry.
type Observer interface {
	// ModelState is told m's new state s (and the reason, when
	// Unavailable); m's runner and times are set when s is Ready.
	ModelState(m *Model, s State, err error)
	ModelRemoved(name string)
}

// RegistryOptions configure a Registry.
type RegistryOptions struct {
	// StrictReadiness makes the server not ready while any model is
	// Unavailable (Triton's --strict-readiness). Without it, the server
	// is ready when no model is still loading and at least one is Ready.
	StrictReadiness bool
	// Observer, when set, is told every state change.
	Observer Observer
}

// Registry holds the models known to the server by name, in whatever
// state, and is the one source of the server's readiness: /readyz, gRPC
// health checking and OIP ServerReady all read it.
type Registry struct {
	opts RegistryOptions

	// notify orders what observers and watchers are told; taken before mu.
	notify   sync.Mutex
	watchers []func(ready bool, reason string)
	lastSent *bool

	mu       sync.RWMutex // guards the fields below
	models   map[string]*Model
	draining bool
	closed   bool
	// started: the models asked for at startup are registered; from then
	// on an empty registry is a server with no model loaded (explicit
	// model control), ready, not one still starting.
	started bool
}

// Started marks the end of startup loading.
func (r *Registry) Started() {
	r.mu.Lock()
	r.started = true
	r.mu.Unlock()
	r.changed(nil, Ready, nil)
}

// NewRegistry returns an empty registry.
func NewRegistry(opts RegistryOptions) *Registry {
	return &Registry{opts: opts, models: map[string]*Model{}}
}

// Add registers a model, in the state it is in (New makes it Loading);
// its name must be valid and not yet taken.
func (r *Registry) Add(m *Model) error {
	if !modelrepo.ValidName(m.Name) {
		return fmt.Errorf("invalid model name %q", m.Name)
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return fmt.Errorf("adding model %q: registry closed", m.Name)
	}
	if _, dup := r.models[m.Name]; dup {
		r.mu.Unlock()
		return fmt.Errorf("model %q added twice", m.Name)
	}
	m.mu.Lock()
	m.reg = r
	s, err := m.state, m.err
	m.mu.Unlock()
	r.models[m.Name] = m
	r.mu.Unlock()
	r.changed(m, s, err)
	return nil
}

// Remove stops serving a model: it leaves the registry (a request for
// it is now NotFound), the requests holding it finish, and its runner
// finishes what it accepted and closes.
func (r *Registry) Remove(ctx context.Context, name string) error {
	r.mu.Lock()
	m, ok := r.models[name]
	if ok {
		delete(r.models, name)
	}
	r.mu.Unlock()
	if !ok {
		return fmt.Errorf("model %q not served", name)
	}
	m.SetState(Unloading, nil)
	m.detach()
	r.removed(name)
	return m.shut(ctx)
}

// Replace puts m in the place of the model of the same name, in one step:
// a request acquires either the old model or m, never neither. The old
// model then stops taking requests, the ones holding it finish, and its
// runner drains and closes before Replace returns. With no model of that
// name, Replace adds m.
func (r *Registry) Replace(ctx context.Context, m *Model) error {
	if !modelrepo.ValidName(m.Name) {
		return fmt.Errorf("invalid model name %q", m.Name)
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return fmt.Errorf("replacing model %q: registry closed", m.Name)
	}
	old := r.models[m.Name]
	m.mu.Lock()
	m.reg = r
	s, err := m.state, m.err
	m.mu.Unlock()
	r.models[m.Name] = m
	r.mu.Unlock()
	r.changed(m, s, err)
	if old == nil || old == m {
		return nil
	}
	old.detach()
	old.SetState(Unloading, nil)
	return old.shut(ctx)
}

// detach stops m from reporting to the registry: its name is another
// model's now, or no one's.
func (m *Model) detach() {
	m.mu.Lock()
	m.reg = nil
	m.mu.Unlock()
}

// shut waits for the requests holding m, then closes its runner, which
// finishes the images it accepted.
func (m *Model) shut(ctx context.Context) error {
	err := m.retire(ctx)
	if m.Runner != nil {
		err = errors.Join(err, m.Runner.Close(ctx))
	}
	return err
}

// Acquire returns the model serving name now, held: Replace and Remove
// wait for its Release before closing it, so a request that acquired a
// model is never refused because the model was reloaded or unloaded
// under it. The caller must call Release.
func (r *Registry) Acquire(name string) (*Model, bool) {
	for {
		m, ok := r.Get(name)
		if !ok {
			return nil, false
		}
		if m.hold() {
			return m, true
		}
		// m was retired after Get: the registry holds its replacement,
		// or nothing, by now.
	}
}

// Get returns the named model, in whatever state. The name is checked
// with modelrepo.ValidName first, so no request text is ever used as a
// path.
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
	return r.sortedLocked()
}

func (r *Registry) sortedLocked() []*Model {
	ms := make([]*Model, 0, len(r.models))
	for _, m := range r.models {
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b *Model) int { return strings.Compare(a.Name, b.Name) })
	return ms
}

// Ready reports whether the server should get traffic and, when not, a
// short reason fit for a probe's answer: not while draining, not before
// a model is registered, not while any model is loading, not without a
// Ready model, and with StrictReadiness not while any is Unavailable.
func (r *Registry) Ready() (bool, string) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.draining {
		return false, "draining: shutting down"
	}
	if len(r.models) == 0 {
		if r.started {
			return true, "ready: no model loaded"
		}
		return false, "starting: no models registered yet"
	}
	var loading, failed []string
	ready := 0
	for _, m := range r.sortedLocked() {
		switch s, err := m.State(); s {
		case Loading:
			loading = append(loading, m.Name)
		case Unavailable:
			failed = append(failed, fmt.Sprintf("%s (%v)", m.Name, err))
		case Ready:
			ready++
		}
	}
	switch {
	case len(loading) > 0:
		return false, fmt.Sprintf("loading: %d of %d models not ready yet: %s",
			len(loading), len(r.models), strings.Join(loading, ", "))
	case len(failed) > 0 && r.opts.StrictReadiness:
		return false, "unavailable: " + strings.Join(failed, "; ")
	case ready == 0:
		return false, "no model ready: " + strings.Join(failed, "; ")
	case len(failed) > 0:
		return true, "ready; unavailable: " + strings.Join(failed, "; ")
	}
	return true, "ready"
}

// Watch calls fn with the readiness now and again on every change, in
// order, until the registry is closed. fn must not block for long nor
// call back into the registry.
func (r *Registry) Watch(fn func(ready bool, reason string)) {
	r.notify.Lock()
	defer r.notify.Unlock()
	// Every change of readiness went through sendLocked, so the others
	// already know what fn is told now.
	r.watchers = append(r.watchers, fn)
	ready, reason := r.Ready()
	r.lastSent = &ready
	fn(ready, reason)
}

// Drain marks the server as shutting down: not ready from now on, for
// good. Call it first thing in shutdown, so load balancers stop sending
// before the server stops accepting. Models keep serving what reaches
// them until Close.
func (r *Registry) Drain() {
	r.mu.Lock()
	r.draining = true
	r.mu.Unlock()
	r.changed(nil, Ready, nil)
}

// Draining reports whether Drain was called.
func (r *Registry) Draining() bool {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.draining
}

// changed tells the observer of a model's new state (m nil for none)
// and the watchers of a change of readiness.
func (r *Registry) changed(m *Model, s State, err error) {
	r.notify.Lock()
	defer r.notify.Unlock()
	if m != nil && r.opts.Observer != nil {
		r.opts.Observer.ModelState(m, s, err)
	}
	r.sendLocked()
}

func (r *Registry) removed(name string) {
	r.notify.Lock()
	defer r.notify.Unlock()
	if r.opts.Observer != nil {
		r.opts.Observer.ModelRemoved(name)
	}
	r.sendLocked()
}

// sendLocked tells the watchers when readiness changed; r.notify is held.
func (r *Registry) sendLocked() {
	ready, reason := r.Ready()
	if r.lastSent != nil && *r.lastSent == ready {
		return
	}
	r.lastSent = &ready
	for _, fn := range r.watchers {
		fn(ready, reason)
	}
}

// Close drains the registry, turns every model Unloading, then closes
// the runners in parallel: each finishes the requests it accepted before
// freeing its engines. It returns when all are closed.
func (r *Registry) Close(ctx context.Context) error {
	r.mu.Lock()
	r.closed, r.draining = true, true
	ms := r.sortedLocked()
	r.mu.Unlock()
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		m.SetState(Unloading, nil)
		if m.Runner == nil {
			continue
		}
		wg.Go(func() {
			if err := m.Runner.Close(ctx); err != nil {
				errs[i] = fmt.Errorf("closing model %q: %w", m.Name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}
