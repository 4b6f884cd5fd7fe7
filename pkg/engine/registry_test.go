package engine_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/engine/enginefake"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// factoryOf hands out fakes of one backend and remembers them.
func factoryOf(name string, made *[]*enginefake.Engine, fail func(instance int) error) engine.Factory {
	return engine.Factory{New: func(_ context.Context, _ *modelrepo.Model, i int) (engine.Engine, error) {
		if fail != nil {
			if err := fail(i); err != nil {
				return nil, err
			}
		}
		e := &enginefake.Engine{Name: name}
		*made = append(*made, e)
		return e, nil
	}}
}

func TestResolve(t *testing.T) {
	var made []*enginefake.Engine
	reg, err := engine.NewRegistry(map[string]engine.Factory{
		engine.ORTCPU:      factoryOf(engine.ORTCPU, &made, nil),
		engine.OpenCV:      factoryOf(engine.OpenCV, &made, nil),
		engine.ORTCUDA:     engine.Unavailable("no GPU here"),
		engine.ORTTensorRT: engine.Unavailable("no GPU here"),
	})
	if err != nil {
		t.Fatal(err)
	}
	c, err := reg.Resolve(engine.Auto)
	if err != nil {
		t.Fatal(err)
	}
	// No GPU: auto is OpenCV, and says why not CUDA.
	if c.Backend != engine.OpenCV || !strings.Contains(c.Reason, "ort-cuda") || !strings.Contains(c.Reason, "no GPU here") {
		t.Errorf("auto: %+v", c)
	}
	for _, name := range []string{engine.ORTCUDA, engine.ORTTensorRT} {
		if _, err := reg.Resolve(name); !errors.Is(err, engine.ErrNotAvailable) {
			t.Errorf("%s: %v, want ErrNotAvailable", name, err)
		}
	}
	if _, err := reg.Resolve("tpu"); err == nil || !strings.Contains(err.Error(), `unknown backend "tpu"`) {
		t.Errorf("tpu: %v", err)
	}
	if c, err := reg.Resolve(engine.ORTCPU); err != nil || c.Backend != engine.ORTCPU || c.Reason != "" {
		t.Errorf("ort-cpu: %+v %v", c, err)
	}
}

func TestNewRegistryRefusesBadFactories(t *testing.T) {
	var made []*enginefake.Engine
	for _, name := range []string{engine.Auto, "", "tpu"} {
		if _, err := engine.NewRegistry(map[string]engine.Factory{name: factoryOf(name, &made, nil)}); err == nil {
			t.Errorf("factory for %q accepted", name)
		}
	}
	if _, err := engine.NewRegistry(map[string]engine.Factory{engine.ORTCPU: {}}); err == nil {
		t.Error("factory without New accepted")
	}
}

func TestLoadFallsBackWhenTheBackendCannotServeTheModel(t *testing.T) {
	var made []*enginefake.Engine
	reg, err := engine.NewRegistry(map[string]engine.Factory{
		engine.OpenCV: factoryOf(engine.OpenCV, &made, func(int) error { return errors.New("probe child died: unsupported layer") }),
		engine.ORTCPU: factoryOf(engine.ORTCPU, &made, nil),
	})
	if err != nil {
		t.Fatal(err)
	}
	m := &modelrepo.Model{Config: modelrepo.Config{Name: "m"}}
	engines, c, err := reg.Load(context.Background(), engine.OpenCV, m, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(engines) != 2 || c.Backend != engine.ORTCPU || !strings.Contains(c.Reason, `opencv cannot serve model "m"`) || !strings.Contains(c.Reason, "unsupported layer") {
		t.Errorf("engines %d, choice %+v", len(engines), c)
	}
	for _, e := range engines {
		if e.Backend() != engine.ORTCPU {
			t.Errorf("engine of %s", e.Backend())
		}
	}
}

func TestLoadClosesInstancesOnFailure(t *testing.T) {
	var made []*enginefake.Engine
	reg, err := engine.NewRegistry(map[string]engine.Factory{
		engine.ORTCPU: factoryOf(engine.ORTCPU, &made, func(i int) error {
			if i == 2 {
				return errors.New("out of memory")
			}
			return nil
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	m := &modelrepo.Model{Config: modelrepo.Config{Name: "m"}}
	_, _, err = reg.Load(context.Background(), engine.ORTCPU, m, 3)
	if err == nil || !strings.Contains(err.Error(), `loading model "m" on ort-cpu: out of memory`) {
		t.Errorf("err = %v", err)
	}
	if len(made) != 2 {
		t.Fatalf("%d instances made, want 2", len(made))
	}
	for i, e := range made {
		if e.Closes() != 1 {
			t.Errorf("instance %d closed %d times", i, e.Closes())
		}
	}
}
