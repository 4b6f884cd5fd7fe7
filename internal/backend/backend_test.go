package backend

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

type fakeEngine struct {
	name   string
	closed *int
}

func (e *fakeEngine) Run(context.Context, *pipeline.Batch) ([]pipeline.Tensor, error) {
	return nil, nil
}
func (e *fakeEngine) Backend() string { return e.name }
func (e *fakeEngine) Close() error    { *e.closed++; return nil }

func TestResolve(t *testing.T) {
	c, err := Resolve(Auto)
	if err != nil {
		t.Fatal(err)
	}
	// No GPU in this build: auto is OpenCV, and says why not CUDA.
	if c.Backend != OpenCV || !strings.Contains(c.Reason, "ort-cuda") {
		t.Errorf("auto: %+v", c)
	}
	for _, name := range []string{ORTCUDA, ORTTensorRT} {
		if _, err := Resolve(name); !errors.Is(err, ErrNotAvailable) {
			t.Errorf("%s: %v, want ErrNotAvailable", name, err)
		}
	}
	if _, err := Resolve("tpu"); err == nil || !strings.Contains(err.Error(), `unknown backend "tpu"`) {
		t.Errorf("tpu: %v", err)
	}
	if c, err := Resolve(ORTCPU); err != nil || c.Backend != ORTCPU || c.Reason != "" {
		t.Errorf("ort-cpu: %+v %v", c, err)
	}
}

// withFactories swaps in factories for the test and restores the real ones.
func withFactories(t *testing.T, fs map[string]Factory) {
	t.Helper()
	saved := map[string]Factory{}
	for name, f := range fs {
		saved[name], _ = factory(name)
		Register(name, f)
	}
	t.Cleanup(func() {
		for name, f := range saved {
			Register(name, f)
		}
	})
}

func TestLoadFallsBackWhenTheBackendCannotServeTheModel(t *testing.T) {
	closed := 0
	withFactories(t, map[string]Factory{
		OpenCV: {New: func(context.Context, *modelrepo.Model, Options, int) (pipeline.Engine, error) {
			return nil, errors.New("probe child died: unsupported layer")
		}},
		ORTCPU: {New: func(_ context.Context, _ *modelrepo.Model, _ Options, i int) (pipeline.Engine, error) {
			return &fakeEngine{name: ORTCPU, closed: &closed}, nil
		}},
	})
	m := &modelrepo.Model{Config: modelrepo.Config{Name: "m"}}
	engines, c, err := Load(context.Background(), OpenCV, m, Options{}, 2)
	if err != nil {
		t.Fatal(err)
	}
	if len(engines) != 2 || c.Backend != ORTCPU || !strings.Contains(c.Reason, `opencv cannot serve model "m"`) || !strings.Contains(c.Reason, "unsupported layer") {
		t.Errorf("engines %d, choice %+v", len(engines), c)
	}
}

func TestLoadClosesInstancesOnFailure(t *testing.T) {
	closed := 0
	withFactories(t, map[string]Factory{
		ORTCPU: {New: func(_ context.Context, _ *modelrepo.Model, _ Options, i int) (pipeline.Engine, error) {
			if i == 2 {
				return nil, errors.New("out of memory")
			}
			return &fakeEngine{name: ORTCPU, closed: &closed}, nil
		}},
	})
	m := &modelrepo.Model{Config: modelrepo.Config{Name: "m"}}
	_, _, err := Load(context.Background(), ORTCPU, m, Options{}, 3)
	if err == nil || !strings.Contains(err.Error(), `loading model "m" on ort-cpu: out of memory`) {
		t.Errorf("err = %v", err)
	}
	if closed != 2 {
		t.Errorf("%d of 2 loaded instances closed", closed)
	}
}
