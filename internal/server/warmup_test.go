package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

func TestWarmUpRemovesModelsThatFail(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	build := func(engines map[string]*fakeEngine) *Registry {
		reg := NewRegistry()
		for name, e := range engines {
			r, err := NewPipelineRunner(testModel(name, modelrepo.TaskClassify, 10), []engine.Engine{e}, RunnerOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if err := reg.Add(&Model{Model: testModel(name, modelrepo.TaskClassify, 10), Runner: r}); err != nil {
				t.Fatal(err)
			}
		}
		return reg
	}
	good, bad := &fakeEngine{classes: 10}, &fakeEngine{classes: 10, fail: errors.New("kernel exploded")}
	reg := build(map[string]*fakeEngine{"good": good, "bad": bad})
	if reg.Ready() {
		t.Fatal("ready before warm-up")
	}
	if err := WarmUp(context.Background(), reg, log); err != nil {
		t.Fatal(err)
	}
	if _, ok := reg.Get("bad"); ok || !bad.closed.Load() {
		t.Errorf("failed model still served (closed %v)", bad.closed.Load())
	}
	m, ok := reg.Get("good")
	if !ok || !m.Ready() || !reg.Ready() || good.images.Load() != 4 {
		t.Errorf("good model: ok %v ready %v, warm-up ran %d images, want one batch of 4", ok, ok && m.Ready(), good.images.Load())
	}
	if err := reg.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	reg = build(map[string]*fakeEngine{"bad": {classes: 10, fail: errors.New("kernel exploded")}})
	if err := WarmUp(context.Background(), reg, log); err == nil || !strings.Contains(err.Error(), "kernel exploded") {
		t.Errorf("all models failing: %v", err)
	}
	_ = reg.Close(context.Background())
}
