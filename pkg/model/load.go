package model

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/pipeline"
)

// LoadOptions say how Load builds the models of a repository.
type LoadOptions struct {
	// Backend is the requested backend name (auto, ort-cpu, ...).
	Backend string
	// Engines builds each model's engines.
	Engines *engine.Registry
	// Runner configures each model's runner.
	Runner RunnerOptions
	// Logger gets one line per model saying which backend serves it.
	Logger *slog.Logger
}

// Load registers every model of repo in reg and builds its engines and
// runner. A model that cannot be loaded stays known, Unavailable with
// the reason and an error log line naming it; the others are still
// served. Load fails only when no model loads at all, or the registry
// refuses one; the models it loaded are then reg's to close.
func Load(ctx context.Context, repo *modelrepo.Repo, reg *Registry, opts LoadOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	if opts.Engines == nil {
		return errors.New("loading models: no engine registry given")
	}
	var errs []error
	// Folders the repository could not read are known, and unavailable.
	for _, f := range repo.Failed {
		entry := New(&modelrepo.Model{Config: modelrepo.Config{Name: f.Name}, Graph: &modelrepo.GraphIO{}}, nil)
		if err := reg.Add(entry); err != nil {
			return err
		}
		log.Error("model not served", "model", f.Name, "err", f.Err)
		entry.SetState(Unavailable, f.Err)
		errs = append(errs, f.Err)
	}
	loaded := 0
	for _, m := range repo.Models {
		entry := New(m, nil)
		if err := reg.Add(entry); err != nil {
			return err
		}
		start := time.Now()
		r, choice, err := loadModel(ctx, m, opts)
		if err != nil {
			log.Error("model not served", "model", m.Name, "err", err)
			errs = append(errs, err)
			entry.SetState(Unavailable, err)
			continue
		}
		entry.Runner, entry.LoadTime = r, time.Since(start)
		loaded++
		attrs := []any{"model", m.Name, "task", m.Task, "backend", choice.Backend, "requested", choice.Requested,
			"instances", m.Batching.Instances, "load", entry.LoadTime.Round(time.Millisecond)}
		if m.Version > 0 {
			attrs = append(attrs, "version", m.Version)
		}
		if len(m.Sources) > 0 {
			attrs = append(attrs, "settings", m.SettingSources())
		}
		if choice.Reason != "" {
			attrs = append(attrs, "reason", choice.Reason)
		}
		log.Info("model loaded", attrs...)
	}
	if loaded == 0 {
		return fmt.Errorf("no model could be served: %w", errors.Join(errs...))
	}
	return nil
}

// loadModel picks the backend of m and builds its engines and runner.
func loadModel(ctx context.Context, m *modelrepo.Model, opts LoadOptions) (Runner, engine.Choice, error) {
	engines, choice, err := opts.Engines.Load(ctx, opts.Backend, m, m.Batching.Instances)
	if err != nil {
		return nil, choice, err
	}
	r, err := NewPipelineRunner(m, engines, opts.Runner)
	if err != nil {
		for _, e := range engines {
			_ = e.Close()
		}
		return nil, choice, err
	}
	return r, choice, nil
}

// WarmUp runs one full batch of a plain grey image through every loaded
// model still Loading, so that the first client does not pay for lazy
// allocations and kernel selection, self-tunes it, and turns it Ready. A
// model whose warm-up fails is closed and turns Unavailable, like a
// model that failed to load; WarmUp fails only when no model is Ready
// afterwards (or ctx ended).
func WarmUp(ctx context.Context, reg *Registry, log *slog.Logger) error {
	var errs []error
	for _, m := range reg.Models() {
		if s, _ := m.State(); s != Loading || m.Runner == nil {
			continue
		}
		start := time.Now()
		if err := warmUp(ctx, m, log); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			err = fmt.Errorf("warming up model %q: %w", m.Name, err)
			log.Error("model not served", "model", m.Name, "err", err)
			errs = append(errs, err)
			if cerr := m.Runner.Close(ctx); cerr != nil {
				log.Warn("closing model", "model", m.Name, "err", cerr)
			}
			m.SetState(Unavailable, err)
			continue
		}
		m.WarmupTime = time.Since(start)
		m.SetState(Ready, nil)
		log.Info("model ready", "model", m.Name, "backend", m.Runner.Backend(), "warmup", m.WarmupTime.Round(time.Millisecond))
	}
	for _, m := range reg.Models() {
		if m.Ready() {
			return nil
		}
	}
	return fmt.Errorf("no model warmed up: %w", errors.Join(errs...))
}

func warmUp(ctx context.Context, m *Model, log *slog.Logger) error {
	h, w := m.Input.Height, m.Input.Width
	pix := make([]byte, h*w*3)
	for i := range pix {
		pix[i] = 128
	}
	n := max(m.Batching.MaxBatchSize, 1)
	inputs := make([]Input, n)
	for i := range inputs {
		inputs[i] = Input{Pixels: pix, Height: h, Width: w}
	}
	res, err := m.Runner.Infer(ctx, inputs, pipeline.Options{})
	if err != nil {
		return err
	}
	if len(res) != n {
		return fmt.Errorf("%d results for %d images", len(res), n)
	}
	// Statistics count clients' requests, not the warm-up's.
	if r, ok := m.Runner.(interface{ resetStatistics() }); ok {
		defer r.resetStatistics()
	}
	// Self-tuning (batching.auto_tune, latency_target_p99) measures the
	// warm engine while the model is not ready yet.
	if t, ok := m.Runner.(interface {
		AutoTune(context.Context, *slog.Logger) error
	}); ok {
		return t.AutoTune(ctx, log)
	}
	return nil
}
