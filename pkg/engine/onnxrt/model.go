package onnxrt

import (
	"fmt"

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
