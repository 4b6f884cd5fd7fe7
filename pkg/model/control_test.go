package model

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/model/modeltest"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// fakeEngines builds a modeltest.Engine of each model's class count,
// with a run time, and counts the engines it built.
func fakeEngines(t *testing.T, built *atomic.Int64) *engine.Registry {
	t.Helper()
	engines, err := engine.NewRegistry(map[string]engine.Factory{
		engine.ORTCPU: {New: func(_ context.Context, m *modelrepo.Model, _ int) (engine.Engine, error) {
			built.Add(1)
			return &modeltest.Engine{Classes: m.NumClasses, Delay: 2 * time.Millisecond}, nil
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return engines
}

func newController(t *testing.T, root string, built *atomic.Int64) (*Registry, *Controller) {
	t.Helper()
	reg := NewRegistry(RegistryOptions{})
	t.Cleanup(func() { _ = reg.Close(context.Background()) })
	c := NewController(reg, Repository{Root: root}, LoadOptions{Backend: engine.ORTCPU, Engines: fakeEngines(t, built), Logger: discard()})
	return reg, c
}

// photo is a JPEG big enough that decoding it takes a while: a reload
// that closed the old model under a request still decoding would fail it.
var photo = modeltest.JPEG(&testing.T{}, 1024, 768, 128)

// infer runs one image on the model serving name now, as the servers do:
// acquire, infer, release.
func infer(ctx context.Context, reg *Registry, name string) (int, error) {
	m, ok := reg.Acquire(name)
	if !ok {
		return 0, errors.New("not found")
	}
	defer m.Release()
	if !m.Ready() {
		return 0, errors.New("not ready")
	}
	res, err := m.Runner.Infer(ctx, []Input{{Encoded: photo}}, pipeline.Options{TopK: 1})
	if err != nil {
		return 0, err
	}
	if len(res) != 1 || len(res[0].Classes) != 1 {
		return 0, errors.New("no class in the result")
	}
	return m.NumClasses, nil
}

// touch changes a file's modification time, as a copy of a new version
// would.
func touch(t *testing.T, path string, at time.Time) {
	t.Helper()
	if err := os.Chtimes(path, at, at); err != nil {
		t.Fatal(err)
	}
}

// TestReloadUnderLoadDropsNothing: while clients send 1,000 requests,
// five reloads (explicit and poll) fail none of them; a corrupt new
// version leaves the old one serving; unload then answers NotFound.
func TestReloadUnderLoadDropsNothing(t *testing.T) {
	root := t.TempDir()
	dir := modeltest.WriteDir(t, root, "cls", 10, "")
	var built atomic.Int64
	reg, c := newController(t, root, &built)
	ctx := ctxT(t)
	if err := c.Start(ctx, nil); err != nil {
		t.Fatal(err)
	}

	const requests, clients = 1000, 8
	var sent, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for sent.Add(1) <= requests {
				if _, err := infer(ctx, reg, "cls"); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				}
			}
		})
	}
	for i := range 5 {
		time.Sleep(20 * time.Millisecond)
		if i%2 == 0 {
			if err := c.Load(ctx, "cls"); err != nil {
				t.Errorf("explicit reload %d: %v", i, err)
			}
			continue
		}
		touch(t, filepath.Join(dir, "model.onnx"), time.Now().Add(time.Duration(i)*time.Second))
		if err := c.Sync(ctx); err != nil {
			t.Errorf("poll reload %d: %v", i, err)
		}
	}
	wg.Wait()
	if n := failed.Load(); n > 0 {
		t.Fatalf("%d of %d requests failed across reloads; first: %v", n, requests, firstErr.Load())
	}
	if got := built.Load(); got != 6 {
		t.Errorf("%d engines built, want 6 (start and five reloads)", got)
	}

	// A corrupt new version (Triton's layout: cls/2/model.onnx) fails to
	// load; version 1 in the plain layout keeps serving and the index
	// says why the new one is not.
	v2 := filepath.Join(dir, "2")
	if err := os.Mkdir(v2, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(v2, "model.onnx"), []byte("\x0a\xff\xff truncated"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := c.Sync(ctx); err == nil {
		t.Fatal("a corrupt new version loaded")
	}
	if _, err := infer(ctx, reg, "cls"); err != nil {
		t.Fatalf("the old version stopped serving after a failed reload: %v", err)
	}
	idx, err := c.Index()
	if err != nil {
		t.Fatal(err)
	}
	if len(idx) != 1 || idx[0].State != Ready || !strings.Contains(idx[0].Reason, "new one failed") {
		t.Errorf("index %+v", idx)
	}
	// Poll does not retry the same broken files every tick.
	before := built.Load()
	if err := c.Sync(ctx); err != nil {
		t.Errorf("second sync of unchanged broken files: %v", err)
	}
	// A good version 2 replaces version 1.
	modeltest.WriteGraph(t, filepath.Join(v2, "model.onnx"), 10)
	if err := c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if m, ok := reg.Get("cls"); !ok || m.Version != 2 || built.Load() != before+1 {
		t.Errorf("version 2 not served (version %v, engines %d)", m.Version, built.Load()-before)
	}

	if err := c.Unload(ctx, "cls"); err != nil {
		t.Fatal(err)
	}
	if _, err := infer(ctx, reg, "cls"); err == nil || err.Error() != "not found" {
		t.Errorf("after unload: %v, want not found", err)
	}
	if err := c.Unload(ctx, "cls"); !errors.Is(err, ErrNotLoaded) {
		t.Errorf("second unload: %v", err)
	}
	idx, _ = c.Index()
	if len(idx) != 1 || idx[0].State != Unavailable || idx[0].Reason != "unloaded" {
		t.Errorf("index after unload %+v", idx)
	}
	if ok, why := reg.Ready(); !ok {
		t.Errorf("no model loaded after an unload: ready %v (%s)", ok, why)
	}
}

// TestPollFollowsTheRepository: new folders load, removed ones unload,
// and a model that fails to load never stops the others.
func TestPollFollowsTheRepository(t *testing.T) {
	root := t.TempDir()
	modeltest.WriteDir(t, root, "a", 3, "")
	var built atomic.Int64
	reg, c := newController(t, root, &built)
	ctx := ctxT(t)
	if err := c.Start(ctx, nil); err != nil {
		t.Fatal(err)
	}
	poll, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- c.Poll(poll, 10*time.Millisecond) }()
	defer func() { stop(); <-done }()

	modeltest.WriteDir(t, root, "b", 5, "")
	bad := modeltest.WriteDir(t, root, "broken", 3, "")
	if err := os.WriteFile(filepath.Join(bad, "model.onnx"), []byte("not onnx"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "b to load", func() bool { m, ok := reg.Get("b"); return ok && m.Ready() })
	waitFor(t, "broken to be known", func() bool { _, ok := reg.Get("broken"); return ok })
	if m, _ := reg.Get("broken"); m.Ready() {
		t.Error("a corrupt model is ready")
	}
	if n, err := infer(ctx, reg, "b"); err != nil || n != 5 {
		t.Errorf("b: %d classes, %v", n, err)
	}
	if err := os.RemoveAll(filepath.Join(root, "a")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a to unload", func() bool { _, ok := reg.Get("a"); return !ok })
	if _, err := infer(ctx, reg, "b"); err != nil {
		t.Errorf("b after a left: %v", err)
	}
}

// TestExplicitStart loads only the models named, and names a model the
// repository does not hold.
func TestExplicitStart(t *testing.T) {
	root := t.TempDir()
	modeltest.WriteDir(t, root, "a", 3, "")
	modeltest.WriteDir(t, root, "b", 3, "")
	var built atomic.Int64
	reg, c := newController(t, root, &built)
	ctx := ctxT(t)
	if err := c.Start(ctx, []string{"b"}); err != nil {
		t.Fatal(err)
	}
	if _, ok := reg.Get("a"); ok {
		t.Error("a loaded though only b was named")
	}
	if _, err := infer(ctx, reg, "b"); err != nil {
		t.Error(err)
	}
	if err := c.Load(ctx, "nope"); !errors.Is(err, ErrNotInRepository) {
		t.Errorf("load of an unknown name: %v", err)
	}
	if err := c.Load(ctx, "a"); err != nil {
		t.Fatal(err)
	}
	if _, err := infer(ctx, reg, "a"); err != nil {
		t.Error(err)
	}

	reg2, c2 := newController(t, root, &built)
	if err := c2.Start(ctx, []string{}); err != nil {
		t.Fatal(err)
	}
	if ok, why := reg2.Ready(); !ok {
		t.Errorf("explicit mode with nothing loaded: ready %v (%s)", ok, why)
	}
	if err := c2.Start(ctx, []string{"zzz"}); !errors.Is(err, ErrNotInRepository) {
		t.Errorf("start naming an unknown model: %v", err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
