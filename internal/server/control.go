package server

import (
	"context"
	"errors"
	"strconv"

	"google.golang.org/grpc/codes"

	"github.com/visionserve/visionserve/pkg/model"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/proto/inference"
	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// control is the model control both APIs share: the repository index in
// every mode, load and unload on request in explicit mode only (Triton
// refuses them in poll and none mode too).
type control struct {
	ctl  *model.Controller // nil: a fixed set of models (benchmarks, tests)
	mode string
}

func (c control) index() ([]model.IndexEntry, error) {
	if c.ctl == nil {
		return nil, &statusError{codes.FailedPrecondition, "this server serves a fixed set of models; it has no repository index"}
	}
	idx, err := c.ctl.Index()
	if err != nil {
		return nil, &statusError{codes.Internal, "reading the model repository: " + err.Error()}
	}
	return idx, nil
}

func (c control) explicit(op, name string) error {
	if name == "" {
		return invalid("model name is missing")
	}
	if !modelrepo.ValidName(name) {
		return invalid("invalid model name %q", clip(name))
	}
	if c.ctl == nil || c.mode != modelrepo.ControlExplicit {
		mode := c.mode
		if c.ctl == nil {
			mode = "a fixed set of models"
		}
		return &statusError{codes.FailedPrecondition, op + " on request needs --model-control-mode explicit; this server runs " + mode}
	}
	return nil
}

func (c control) load(ctx context.Context, name string) error {
	if err := c.explicit("load", name); err != nil {
		return err
	}
	return controlError(c.ctl.Load(ctx, name))
}

func (c control) unload(ctx context.Context, name string) error {
	if err := c.explicit("unload", name); err != nil {
		return err
	}
	return controlError(c.ctl.Unload(ctx, name))
}

// controlError maps a Controller error to a status: NotFound for a name
// the repository or the server does not hold, FailedPrecondition for a
// model that cannot be loaded (its files are what must change).
func controlError(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, model.ErrNotInRepository), errors.Is(err, model.ErrNotLoaded):
		return notFound("%v", err)
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	}
	return &statusError{codes.FailedPrecondition, err.Error()}
}

// LoadModel implements VisionService.
func (s *visionService) LoadModel(ctx context.Context, req *visionv1.LoadModelRequest) (*visionv1.LoadModelResponse, error) {
	if err := s.control.load(ctx, req.GetModel()); err != nil {
		return nil, toStatus(err)
	}
	m, ok := s.reg.Get(req.GetModel())
	if !ok {
		return nil, toStatus(notFound("model %q was unloaded meanwhile", req.GetModel()))
	}
	return &visionv1.LoadModelResponse{Model: modelInfo(m, s.reg.Draining())}, nil
}

// UnloadModel implements VisionService.
func (s *visionService) UnloadModel(ctx context.Context, req *visionv1.UnloadModelRequest) (*visionv1.UnloadModelResponse, error) {
	if err := s.control.unload(ctx, req.GetModel()); err != nil {
		return nil, toStatus(err)
	}
	return &visionv1.UnloadModelResponse{}, nil
}

// RepositoryIndex implements Triton's model repository extension.
func (s *oipService) RepositoryIndex(_ context.Context, req *inference.RepositoryIndexRequest) (*inference.RepositoryIndexResponse, error) {
	if err := checkRepositoryName(req.GetRepositoryName()); err != nil {
		return nil, toStatus(err)
	}
	idx, err := s.control.index()
	if err != nil {
		return nil, toStatus(err)
	}
	resp := &inference.RepositoryIndexResponse{}
	for _, e := range idx {
		if req.GetReady() && e.State != model.Ready {
			continue
		}
		v := "1"
		if e.Version > 0 {
			v = strconv.FormatInt(e.Version, 10)
		}
		resp.Models = append(resp.Models, &inference.RepositoryIndexResponse_ModelIndex{
			Name: e.Name, Version: v, State: e.State.String(), Reason: e.Reason,
		})
	}
	return resp, nil
}

// RepositoryModelLoad implements Triton's model repository extension.
func (s *oipService) RepositoryModelLoad(ctx context.Context, req *inference.RepositoryModelLoadRequest) (*inference.RepositoryModelLoadResponse, error) {
	if err := checkRepositoryName(req.GetRepositoryName()); err != nil {
		return nil, toStatus(err)
	}
	for k := range req.GetParameters() {
		return nil, toStatus(invalid("load parameter %q is not supported: the model loads from its repository files", clip(k)))
	}
	if err := s.control.load(ctx, req.GetModelName()); err != nil {
		return nil, toStatus(err)
	}
	return &inference.RepositoryModelLoadResponse{}, nil
}

// RepositoryModelUnload implements Triton's model repository extension.
func (s *oipService) RepositoryModelUnload(ctx context.Context, req *inference.RepositoryModelUnloadRequest) (*inference.RepositoryModelUnloadResponse, error) {
	if err := checkRepositoryName(req.GetRepositoryName()); err != nil {
		return nil, toStatus(err)
	}
	for k := range req.GetParameters() {
		if k != "unload_dependents" { // no ensembles: nothing depends on a model
			return nil, toStatus(invalid("unload parameter %q is not supported", clip(k)))
		}
	}
	if err := s.control.unload(ctx, req.GetModelName()); err != nil {
		return nil, toStatus(err)
	}
	return &inference.RepositoryModelUnloadResponse{}, nil
}

// checkRepositoryName accepts the one repository, named "".
func checkRepositoryName(name string) error {
	if name != "" {
		return notFound("repository %q not found: this server has one model repository, named \"\"", clip(name))
	}
	return nil
}
