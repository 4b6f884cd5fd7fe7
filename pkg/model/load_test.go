package model

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// loaded registers one classifier per engine, Loading with its runner, as
// Load leaves them.
func loaded(t *testing.T, opts RegistryOptions, engines map[string]*modeltest.Engine) *Registry {
	t.Helper()
	reg := NewRegistry(opts)
	for name, e := range engines {
		m := modeltest.Model(name, modelrepo.TaskClassify, 10)
		r, err := NewPipelineRunner(m, []engine.Engine{e}, RunnerOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := reg.Add(New(m, r)); err != nil {
			t.Fatal(err)
		}
	}
	return reg
}

func TestWarmUpMakesModelsThatFailUnavailable(t *testing.T) {
	good, bad := &modeltest.Engine{Classes: 10}, &modeltest.Engine{Classes: 10, Fail: errors.New("kernel exploded")}
	reg := loaded(t, RegistryOptions{}, map[string]*modeltest.Engine{"good": good, "bad": bad})
	if ok, why := reg.Ready(); ok || !strings.Contains(why, "loading") {
		t.Fatalf("before warm-up: ready %v (%s)", ok, why)
	}
	if err := WarmUp(ctxT(t), reg, discard()); err != nil {
		t.Fatal(err)
	}
	m, ok := reg.Get("bad")
	if !ok {
		t.Fatal("a model that failed is no longer known")
	}
	if s, err := m.State(); s != Unavailable || err == nil || !strings.Contains(err.Error(), "kernel exploded") || !bad.Closed() {
		t.Errorf("failed model: state %v (%v), engine closed %v", s, err, bad.Closed())
	}
	m, ok = reg.Get("good")
	if !ok || !m.Ready() || good.Images() != 4 {
		t.Errorf("good model: ok %v ready %v, warm-up ran %d images, want one batch of 4", ok, ok && m.Ready(), good.Images())
	}
	// Not strict: one model serves, so the server is ready and says what
	// is missing.
	if ok, why := reg.Ready(); !ok || !strings.Contains(why, "bad (") {
		t.Errorf("ready %v (%s), want ready naming the unavailable model", ok, why)
	}
	if err := reg.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	reg = loaded(t, RegistryOptions{}, map[string]*modeltest.Engine{"bad": {Classes: 10, Fail: errors.New("kernel exploded")}})
	if err := WarmUp(ctxT(t), reg, discard()); err == nil || !strings.Contains(err.Error(), "kernel exploded") {
		t.Errorf("all models failing: %v", err)
	}
	if ok, why := reg.Ready(); ok || !strings.Contains(why, "no model ready") {
		t.Errorf("no model ready: ready %v (%s)", ok, why)
	}
	_ = reg.Close(context.Background())
}

// TestStrictReadiness: with StrictReadiness one Unavailable model keeps
// the server not ready, and the reason names it.
func TestStrictReadiness(t *testing.T) {
	reg := loaded(t, RegistryOptions{StrictReadiness: true}, map[string]*modeltest.Engine{
		"good": {Classes: 10}, "bad": {Classes: 10, Fail: errors.New("kernel exploded")},
	})
	defer reg.Close(context.Background())
	if err := WarmUp(ctxT(t), reg, discard()); err != nil {
		t.Fatal(err)
	}
	if ok, why := reg.Ready(); ok || !strings.Contains(why, "unavailable: bad (") || !strings.Contains(why, "kernel exploded") {
		t.Errorf("ready %v (%s), want not ready naming bad", ok, why)
	}
}

type stateLog struct{ events []string }

func (l *stateLog) ModelState(m *Model, s State, _ error) {
	l.events = append(l.events, m.Name+"="+s.String())
}
func (l *stateLog) ModelRemoved(name string) { l.events = append(l.events, name+" removed") }

// TestRegistryTellsStatesAndReadinessInOrder: the observer sees every
// state a model passes, and watchers see each change of readiness once,
// ending not ready when draining.
func TestRegistryTellsStatesAndReadinessInOrder(t *testing.T) {
	log := &stateLog{}
	reg := NewRegistry(RegistryOptions{Observer: log})
	var seen []bool
	reg.Watch(func(ready bool, _ string) { seen = append(seen, ready) })
	e := &modeltest.Engine{Classes: 10}
	m := modeltest.Model("cls", modelrepo.TaskClassify, 10)
	r, err := NewPipelineRunner(m, []engine.Engine{e}, RunnerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := reg.Add(New(m, r)); err != nil {
		t.Fatal(err)
	}
	if err := WarmUp(ctxT(t), reg, discard()); err != nil {
		t.Fatal(err)
	}
	reg.Drain()
	if ok, why := reg.Ready(); ok || !strings.Contains(why, "draining") {
		t.Errorf("draining: ready %v (%s)", ok, why)
	}
	if err := reg.Remove(context.Background(), "cls"); err != nil {
		t.Fatal(err)
	}
	if _, ok := reg.Get("cls"); ok || !e.Closed() {
		t.Errorf("removed model still known, or its engine open (closed %v)", e.Closed())
	}
	if got, want := strings.Join(log.events, " "), "cls=LOADING cls=READY cls=UNLOADING cls removed"; got != want {
		t.Errorf("observer saw %q, want %q", got, want)
	}
	if len(seen) != 3 || seen[0] || !seen[1] || seen[2] {
		t.Errorf("watcher saw %v, want [false true false]", seen)
	}
	if err := reg.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestLoadKeepsModelsThatFailKnown(t *testing.T) {
	good := modeltest.Model("good", modelrepo.TaskClassify, 10)
	bad := modeltest.Model("bad", modelrepo.TaskClassify, 10)
	engines, err := engine.NewRegistry(map[string]engine.Factory{
		engine.ORTCPU: {
			Available: func() error { return nil },
			New: func(_ context.Context, m *modelrepo.Model, _ int) (engine.Engine, error) {
				if m.Name == "bad" {
					return nil, errors.New("graph cannot be imported")
				}
				return &modeltest.Engine{Classes: 10}, nil
			},
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	reg := NewRegistry(RegistryOptions{})
	defer reg.Close(context.Background())
	err = Load(ctxT(t), &modelrepo.Repo{Models: []*modelrepo.Model{bad, good}}, reg, LoadOptions{Backend: engine.ORTCPU, Engines: engines, Logger: discard()})
	if err != nil {
		t.Fatal(err)
	}
	m, ok := reg.Get("bad")
	if !ok {
		t.Fatal("model that failed to load is not known")
	}
	if s, err := m.State(); s != Unavailable || err == nil || !strings.Contains(err.Error(), "cannot be imported") {
		t.Errorf("bad: %v (%v)", s, err)
	}
	if m, _ := reg.Get("good"); m == nil || m.Runner == nil {
		t.Fatal("good model not loaded")
	}
}

// TestInferDecodesNothingForAGoneClient: the context is checked before
// each image is decoded; a request whose client has gone costs no decode
// (its corrupt image would otherwise be reported).
func TestInferDecodesNothingForAGoneClient(t *testing.T) {
	e := &modeltest.Engine{Classes: 10}
	m := modeltest.Model("cls", modelrepo.TaskClassify, 10)
	r, err := NewPipelineRunner(m, []engine.Engine{e}, RunnerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close(context.Background())
	ctx, cancel := context.WithCancel(ctxT(t))
	cancel()
	_, err = r.Infer(ctx, []Input{{Encoded: []byte("\xff\xd8\xff not a jpeg")}}, pipeline.Options{})
	if !errors.Is(err, context.Canceled) {
		t.Errorf("Infer for a gone client: %v, want context.Canceled", err)
	}
	if s := r.Stats(); s.Queued != 0 {
		t.Errorf("%d images left queued", s.Queued)
	}
}
