package onnxrt

import (
	"context"
	"fmt"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// NewForModel loads a repository model, taking the input and output names
// from its config when they are set there. Fields of opts that are set win.
func NewForModel(m *modelrepo.Model, opts Options) (*Engine, error) {
	if opts.InputName == "" {
		opts.InputName = m.Config.Input.Name
	}
	if opts.OutputNames == nil && m.Config.Output.Name != "" {
		opts.OutputNames = []string{m.Config.Output.Name}
	}
	e, err := New(m.Path, opts)
	if err != nil {
		return nil, fmt.Errorf("loading model %q: %w", m.Name, err)
	}
	return e, nil
}

// Factory is the ort-cpu backend: it initialises ONNX Runtime from libPath
// on first use and loads each instance with opts (the model fills in its
// input and output names).
func Factory(libPath string, opts Options) engine.Factory {
	return engine.Factory{New: func(_ context.Context, m *modelrepo.Model, _ int) (engine.Engine, error) {
		if err := Init(libPath); err != nil {
			return nil, err
		}
		return NewForModel(m, opts)
	}}
}
