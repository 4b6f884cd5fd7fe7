package model

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/visionserve/visionserve/pkg/modelrepo"
)

// ErrNotInRepository is the error of a load of a name the repository
// does not hold.
var ErrNotInRepository = errors.New("not in the model repository")

// ErrNotLoaded is the error of an unload of a model that is not loaded.
var ErrNotLoaded = errors.New("not loaded")

// Repository is where the Controller finds models: a repository folder
// (see modelrepo.Scan) and single ONNX files beside it.
type Repository struct {
	// Root is the repository folder. It may be missing when Files are
	// given.
	Root string
	// Files are NAME.onnx files served as model NAME (infer-server
	// --model).
	Files []string
}

// scan lists the models of the repository by name.
func (r Repository) scan() (map[string]modelrepo.Found, error) {
	found := map[string]modelrepo.Found{}
	list, err := modelrepo.Scan(r.Root)
	if err != nil && !(len(r.Files) > 0 && errors.Is(err, os.ErrNotExist)) {
		return nil, err
	}
	for _, f := range list {
		found[f.Name] = f
	}
	for _, p := range r.Files {
		base, ok := strings.CutSuffix(filepath.Base(p), ".onnx")
		if !ok || !modelrepo.ValidName(base) {
			return nil, fmt.Errorf("--model %s: want NAME.onnx with NAME of letters, digits, '_', '-' or '.'", p)
		}
		if prev, dup := found[base]; dup {
			return nil, fmt.Errorf("--model %s: a model %q is also in %s", p, base, prev.Dir)
		}
		found[base] = modelrepo.Found{Name: base, Dir: filepath.Dir(p), File: p}
	}
	return found, nil
}

// fingerprint identifies what a model was loaded from: the size and
// modification time of its files and its version. A change means reload.
func fingerprint(f modelrepo.Found) string {
	var b strings.Builder
	b.WriteString(strconv.FormatInt(f.Version, 10))
	files := []string{f.File, f.Config}
	if f.File == "" {
		files = append(files, filepath.Join(f.Dir, modelrepo.DefaultModelFile))
	}
	if f.Config != "" || f.File != filepath.Join(f.Dir, f.Name+".onnx") {
		files = append(files, filepath.Join(f.Dir, modelrepo.DefaultLabels))
	}
	for _, p := range files {
		if p == "" {
			continue
		}
		if st, err := os.Stat(p); err == nil {
			fmt.Fprintf(&b, "|%s:%d:%d", p, st.Size(), st.ModTime().UnixNano())
		} else {
			fmt.Fprintf(&b, "|%s:-", p)
		}
	}
	return b.String()
}

// IndexEntry is one model of the repository index.
type IndexEntry struct {
	Name    string
	Version int64 // 0 in the plain layout
	// State is the model's state; a model of the repository that is not
	// loaded is Unavailable with the reason.
	State  State
	Reason string
}

// Controller loads, reloads and unloads the models of a Repository into
// a Registry, one operation at a time. A reload never drops a request:
// the new model loads and warms up beside the old one, the registry
// switches to it in one step, and the old one finishes what it holds and
// closes. A new version that fails leaves the old one serving.
type Controller struct {
	reg  *Registry
	repo Repository
	opts LoadOptions
	log  *slog.Logger

	mu sync.Mutex // serialises the operations; guards the fields below
	// loaded is the fingerprint each served model was loaded from.
	loaded map[string]string
	// failed is the fingerprint and error of the last failed load of a
	// name (poll retries only when its files change).
	failed map[string]failure
	// unloaded are the names unloaded on request (for the index).
	unloaded map[string]bool
}

type failure struct {
	fp  string
	err error
}

// NewController returns a controller of reg over repo; models load with
// opts.
func NewController(reg *Registry, repo Repository, opts LoadOptions) *Controller {
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Controller{reg: reg, repo: repo, opts: opts, log: log,
		loaded: map[string]string{}, failed: map[string]failure{}, unloaded: map[string]bool{}}
}

// Start loads the models at startup: the ones named, or every model of
// the repository when names is nil or holds "*". Models that fail are
// registered Unavailable with the reason. It fails when none of the
// models it was asked for is Ready (for a nil names: when none could be
// served).
func (c *Controller) Start(ctx context.Context, names []string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	found, err := c.repo.scan()
	if err != nil {
		return err
	}
	all := names == nil || slices.Contains(names, "*")
	repo := &modelrepo.Repo{Root: c.repo.Root}
	var missing []error
	if !all {
		for _, n := range names {
			if _, ok := found[n]; !ok {
				missing = append(missing, fmt.Errorf("model %q: %w", n, ErrNotInRepository))
			}
		}
	}
	fps := map[string]string{}
	for _, name := range sortedNames(found) {
		if !all && !slices.Contains(names, name) {
			continue
		}
		f := found[name]
		fps[name] = fingerprint(f)
		m, err := f.Load()
		if err != nil {
			repo.Failed = append(repo.Failed, modelrepo.FailedModel{Name: name, Err: err})
			c.failed[name] = failure{fps[name], err}
			continue
		}
		repo.Models = append(repo.Models, m)
	}
	if len(missing) > 0 {
		return errors.Join(missing...)
	}
	if len(repo.Models) == 0 && len(repo.Failed) == 0 {
		if !all {
			c.reg.Started()
			return nil // explicit mode with nothing to load yet
		}
		return fmt.Errorf("model repository %s holds no model (a folder with %s or %s, or a NAME.onnx file); run `make models`", c.repo.Root, modelrepo.ConfigFile, modelrepo.DefaultModelFile)
	}
	defer c.reg.Started()
	if err := Load(ctx, repo, c.reg, c.opts); err != nil {
		return err
	}
	if err := WarmUp(ctx, c.reg, c.log); err != nil {
		return err
	}
	for _, m := range c.reg.Models() {
		if m.Ready() {
			c.loaded[m.Name] = fps[m.Name]
		} else if _, why := m.State(); why != nil {
			c.failed[m.Name] = failure{fps[m.Name], why}
		}
	}
	return nil
}

// Load loads the named model of the repository, or reloads it when it
// is served: the served version keeps answering until the new one is
// Ready, and keeps serving if the new one fails (the error is returned).
func (c *Controller) Load(ctx context.Context, name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	found, err := c.repo.scan()
	if err != nil {
		return err
	}
	f, ok := found[name]
	if !ok {
		return fmt.Errorf("model %q: %w", name, ErrNotInRepository)
	}
	return c.loadLocked(ctx, f)
}

func (c *Controller) loadLocked(ctx context.Context, f modelrepo.Found) error {
	fp := fingerprint(f)
	start := time.Now()
	old, had := c.reg.Get(f.Name)
	serving := had && old.Ready()
	fail := func(err error) error {
		err = fmt.Errorf("loading model %q: %w", f.Name, err)
		c.failed[f.Name] = failure{fp, err}
		if serving {
			c.log.Error("model reload failed; the loaded version keeps serving", "model", f.Name, "err", err)
			return err
		}
		c.log.Error("model not served", "model", f.Name, "err", err)
		if had {
			old.SetState(Unavailable, err)
		} else {
			entry := New(&modelrepo.Model{Config: modelrepo.Config{Name: f.Name}, Graph: &modelrepo.GraphIO{}}, nil)
			entry.SetState(Unavailable, err)
			if aerr := c.reg.Add(entry); aerr != nil {
				return errors.Join(err, aerr)
			}
		}
		return err
	}
	cfg, err := f.Load()
	if err != nil {
		return fail(err)
	}
	entry := New(cfg, nil)
	if !serving {
		// Nothing answers for the name yet: show it loading. A failure
		// from here on turns this entry Unavailable.
		if err := c.reg.Replace(ctx, entry); err != nil {
			return err
		}
		old, had = entry, true
	}
	r, choice, err := loadModel(ctx, cfg, c.opts)
	if err != nil {
		return fail(err)
	}
	entry.Runner, entry.LoadTime = r, time.Since(start)
	warm := time.Now()
	if err := warmUp(ctx, entry, c.log); err != nil {
		_ = r.Close(context.WithoutCancel(ctx))
		entry.Runner = nil
		return fail(fmt.Errorf("warming up: %w", err))
	}
	entry.WarmupTime = time.Since(warm)
	entry.SetState(Ready, nil)
	if serving {
		// The switch: from here requests acquire the new model; the old
		// one finishes those that hold it, then drains and closes.
		if err := c.reg.Replace(drainContext(ctx), entry); err != nil {
			c.log.Warn("closing the replaced model", "model", f.Name, "err", err)
		}
	}
	c.loaded[f.Name] = fp
	delete(c.failed, f.Name)
	delete(c.unloaded, f.Name)
	verb := "model loaded"
	if serving {
		verb = "model reloaded"
	}
	c.log.Info(verb, "model", f.Name, "version", cfg.Version, "backend", choice.Backend, "settings", cfg.SettingSources(),
		"load", entry.LoadTime.Round(time.Millisecond), "warmup", entry.WarmupTime.Round(time.Millisecond))
	return nil
}

// drainContext bounds how long a replaced or unloaded model may take to
// finish its requests, whatever happens to the request that asked.
func drainContext(ctx context.Context) context.Context {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	context.AfterFunc(ctx, cancel)
	return ctx
}

// Unload stops serving the named model: new requests for it are
// NotFound, and the ones it holds finish first.
func (c *Controller) Unload(ctx context.Context, name string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.unloadLocked(ctx, name)
}

func (c *Controller) unloadLocked(ctx context.Context, name string) error {
	if _, ok := c.reg.Get(name); !ok {
		return fmt.Errorf("model %q: %w", name, ErrNotLoaded)
	}
	err := c.reg.Remove(drainContext(ctx), name)
	delete(c.loaded, name)
	delete(c.failed, name)
	c.unloaded[name] = true
	c.log.Info("model unloaded", "model", name)
	return err
}

// Index lists the models of the repository and the ones served, by name,
// with their state: a model of the repository that is not loaded is
// Unavailable, with the reason.
func (c *Controller) Index() ([]IndexEntry, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	found, err := c.repo.scan()
	if err != nil {
		return nil, err
	}
	byName := map[string]IndexEntry{}
	for name, f := range found {
		e := IndexEntry{Name: name, Version: f.Version, State: Unavailable, Reason: "not loaded"}
		if c.unloaded[name] {
			e.Reason = "unloaded"
		}
		if fl, ok := c.failed[name]; ok {
			e.Reason = fl.err.Error()
		}
		byName[name] = e
	}
	for _, m := range c.reg.Models() {
		st, why := m.State()
		e := IndexEntry{Name: m.Name, Version: m.Version, State: st}
		if why != nil {
			e.Reason = why.Error()
		}
		if fl, ok := c.failed[m.Name]; ok && st == Ready {
			e.Reason = "serving the loaded version; the new one failed: " + fl.err.Error()
		}
		byName[m.Name] = e
	}
	out := make([]IndexEntry, 0, len(byName))
	for _, name := range sortedNames(byName) {
		out = append(out, byName[name])
	}
	return out, nil
}

// Poll syncs the registry with the repository every interval until ctx
// ends (ControlPoll).
func (c *Controller) Poll(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if err := c.Sync(ctx); err != nil && ctx.Err() == nil {
				c.log.Warn("polling the model repository", "err", err)
			}
		}
	}
}

// Sync makes the registry match the repository once: it loads new
// models, reloads changed ones and unloads removed ones. A model whose
// last load failed is retried only once its files change.
func (c *Controller) Sync(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	found, err := c.repo.scan()
	if err != nil {
		return err
	}
	var errs []error
	for _, name := range sortedNames(found) {
		f := found[name]
		fp := fingerprint(f)
		if c.loaded[name] == fp {
			continue
		}
		if fl, ok := c.failed[name]; ok && fl.fp == fp {
			continue
		}
		if err := c.loadLocked(ctx, f); err != nil {
			errs = append(errs, err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	for _, m := range c.reg.Models() {
		if _, ok := found[m.Name]; ok {
			continue
		}
		if err := c.unloadLocked(ctx, m.Name); err != nil {
			errs = append(errs, err)
		}
		delete(c.unloaded, m.Name)
	}
	return errors.Join(errs...)
}

func sortedNames[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for n := range m {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}
