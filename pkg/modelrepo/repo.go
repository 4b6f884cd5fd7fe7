package modelrepo

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// ConfigFile is the name of a model's config in its folder.
const ConfigFile = "config.yaml"

// Model is one validated model of a repository.
type Model struct {
	Config
	// Dir is the model's folder.
	Dir string
	// Path is the ONNX file.
	Path string
	// LabelNames holds the class names, index order of the model output.
	LabelNames []string
	// NumClasses is the number of classes the output carries.
	NumClasses int
	// Graph holds the inputs and outputs read from the ONNX graph.
	Graph *GraphIO
	// Version is the version folder served (Triton's layout), 0 in the
	// plain layout.
	Version int64
	// Sources says where each setting came from: config.yaml, the ONNX
	// metadata, the graph, a preset or the default (keys as in
	// config.yaml: "task", "input.mean", "labels", ...).
	Sources map[string]Source
}

// Repo is a loaded model repository.
type Repo struct {
	Root   string
	Models []*Model // sorted by name
	// Failed are the model folders that could not be read (a bad
	// config.yaml, a truncated model.onnx), by name, with the reason: the
	// server knows them as unavailable and serves the others.
	Failed []FailedModel
}

// FailedModel is a model folder that could not be read.
type FailedModel struct {
	Name string
	Err  error
}

// Get returns the named model, or false.
func (r *Repo) Get(name string) (*Model, bool) {
	i, ok := slices.BinarySearchFunc(r.Models, name, func(m *Model, n string) int { return strings.Compare(m.Name, n) })
	if !ok {
		return nil, false
	}
	return r.Models[i], true
}

// Names lists the model names in order.
func (r *Repo) Names() []string {
	names := make([]string, len(r.Models))
	for i, m := range r.Models {
		names[i] = m.Name
	}
	return names
}

// LoadRepo loads every model of root (see Scan for the layouts). A model
// that fails validation is listed in Failed with the reason, and the
// others load; the load fails only when no model loads at all.
func LoadRepo(root string) (*Repo, error) {
	found, err := Scan(root)
	if err != nil {
		return nil, err
	}
	repo := &Repo{Root: root}
	var errs []error
	for _, f := range found {
		m, err := f.Load()
		if err != nil {
			errs = append(errs, err)
			repo.Failed = append(repo.Failed, FailedModel{Name: f.Name, Err: err})
			continue
		}
		repo.Models = append(repo.Models, m)
	}
	if len(repo.Models) == 0 && len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if len(repo.Models) == 0 {
		return nil, fmt.Errorf("model repository %s holds no model (a folder with %s or model.onnx, or a NAME.onnx file); run `make models`", root, ConfigFile)
	}
	slices.SortFunc(repo.Models, func(a, b *Model) int { return strings.Compare(a.Name, b.Name) })
	return repo, nil
}

// Found is a model that Scan found in a repository, not yet read.
type Found struct {
	Name string
	// Dir is the model's folder (config.yaml and labels live there), or
	// the folder of a bare NAME.onnx file.
	Dir string
	// Config is config.yaml's path, "" when the model has none.
	Config string
	// File is the ONNX file; "" when config.yaml names it (model_file).
	File string
	// Version is the version folder the model comes from (Triton's
	// NAME/1/model.onnx layout), 0 in the plain layout.
	Version int64
}

// Scan lists the models of a repository folder, sorted by name:
//   - a folder NAME holding config.yaml, model.onnx, or both;
//   - a folder NAME holding version folders 1, 2, ... each with
//     model.onnx (Triton's layout): the highest version is served, and
//     config.yaml and the labels stay in NAME;
//   - a file NAME.onnx in the repository root, understood from its
//     metadata alone.
//
// Names that could escape the repository are skipped.
func Scan(root string) ([]Found, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("reading model repository: %w", err)
	}
	var found []Found
	for _, e := range entries {
		name := e.Name()
		path := filepath.Join(root, name)
		if !e.IsDir() {
			if base, ok := strings.CutSuffix(name, ".onnx"); ok && ValidName(base) && isFile(path) {
				found = append(found, Found{Name: base, Dir: root, File: path})
			}
			continue
		}
		if !ValidName(name) {
			continue
		}
		f := Found{Name: name, Dir: path}
		if isFile(filepath.Join(path, ConfigFile)) {
			f.Config = filepath.Join(path, ConfigFile)
		}
		if v := latestVersion(path); v > 0 {
			f.Version = v
			f.File = filepath.Join(path, strconv.FormatInt(v, 10), DefaultModelFile)
		} else if isFile(filepath.Join(path, DefaultModelFile)) {
			f.File = filepath.Join(path, DefaultModelFile)
		}
		if f.Config == "" && f.File == "" {
			continue
		}
		found = append(found, f)
	}
	slices.SortFunc(found, func(a, b Found) int { return strings.Compare(a.Name, b.Name) })
	return found, nil
}

// DefaultModelFile is the ONNX file of a model folder or version folder.
const DefaultModelFile = "model.onnx"

// latestVersion is the highest numbered sub-folder of dir holding a
// model.onnx, or 0.
func latestVersion(dir string) int64 {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var best int64
	for _, e := range entries {
		v, err := strconv.ParseInt(e.Name(), 10, 64)
		if err != nil || v < 1 || !e.IsDir() || e.Name() != strconv.FormatInt(v, 10) {
			continue
		}
		if v > best && isFile(filepath.Join(dir, e.Name(), DefaultModelFile)) {
			best = v
		}
	}
	return best
}

func isFile(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular()
}

// Load reads and validates the model folder root/name (any layout Scan
// accepts for a folder).
func Load(root, name string) (*Model, error) {
	if !ValidName(name) {
		return nil, fmt.Errorf("invalid model name %q", name)
	}
	found, err := Scan(root)
	if err != nil {
		return nil, err
	}
	for _, f := range found {
		if f.Name == name {
			return f.Load()
		}
	}
	return nil, fmt.Errorf("model %q: no folder with %s or %s, and no %s.onnx, in %s", name, ConfigFile, DefaultModelFile, name, root)
}

// LoadFile reads a bare ONNX file outside any repository (infer-server
// --model PATH.onnx); its name is the file name without .onnx.
func LoadFile(path string) (*Model, error) {
	base, ok := strings.CutSuffix(filepath.Base(path), ".onnx")
	if !ok || !ValidName(base) {
		return nil, fmt.Errorf("model file %s: want NAME.onnx with NAME of letters, digits, '_', '-' or '.'", path)
	}
	return Found{Name: base, Dir: filepath.Dir(path), File: path}.Load()
}

// Load reads and validates the model.
func (f Found) Load() (*Model, error) {
	var raw []byte
	if f.Config != "" {
		var err error
		if raw, err = os.ReadFile(f.Config); err != nil {
			return nil, fmt.Errorf("model %q: %w", f.Name, err)
		}
	}
	m, err := resolve(f, raw)
	if err != nil {
		return nil, fmt.Errorf("model %q: %w", f.Name, err)
	}
	return m, nil
}

// ParseConfig decodes a config.yaml strictly: unknown fields are errors.
func ParseConfig(raw []byte) (Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return Config{}, fmt.Errorf("parsing: %w", err)
	}
	return cfg, nil
}

// resolve fills the config from config.yaml (raw, nil when absent), the
// ONNX graph and its metadata, a preset and the defaults, in that order
// of precedence, reads the labels and validates the result.
func resolve(f Found, raw []byte) (*Model, error) {
	cfg, err := ParseConfig(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ConfigFile, err)
	}
	present, err := configKeys(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ConfigFile, err)
	}
	if cfg.Name == "" {
		cfg.Name = f.Name
	}
	if cfg.Name != f.Name {
		return nil, fmt.Errorf("config names the model %q but its folder is %q", cfg.Name, f.Name)
	}
	path := f.File
	if present["model_file"] || path == "" {
		if cfg.ModelFile == "" {
			cfg.ModelFile = DefaultModelFile
		}
		if strings.ContainsAny(cfg.ModelFile, `/\`) || strings.HasPrefix(cfg.ModelFile, ".") {
			return nil, fmt.Errorf("model_file %q must be a plain file name in the model folder", cfg.ModelFile)
		}
		path = filepath.Join(f.Dir, cfg.ModelFile)
		if f.Version > 0 {
			path = filepath.Join(f.Dir, strconv.FormatInt(f.Version, 10), cfg.ModelFile)
		}
	}
	cfg.ModelFile = filepath.Base(path)
	switch cfg.Preset {
	case "", PresetImageNet, PresetNone:
	default:
		return nil, fmt.Errorf("unknown preset %q (want %s or %s)", cfg.Preset, PresetImageNet, PresetNone)
	}
	graph, err := readGraph(path)
	if err != nil {
		return nil, err
	}
	det, err := detect(graph, cfg.Preset)
	if err != nil {
		return nil, err
	}
	sources := det.merge(&cfg, present)
	if cfg.Task == "" {
		what := "no " + ConfigFile
		if raw != nil {
			what = ConfigFile + " sets no task"
		}
		return nil, fmt.Errorf("cannot tell what this model is: %s, no Ultralytics metadata (task, names) in the ONNX file, and its output %v is not a 1000-way classifier; set task (classify or detect) and labels in %s (docs/models.md)", what, shapeOf(graph), ConfigFile)
	}
	w, h := cfg.Input.Width, cfg.Input.Height
	if err := fillFromIO(&cfg, graph); err != nil {
		return nil, err
	}
	for key, v := range map[string][2]int{"input.width": {w, cfg.Input.Width}, "input.height": {h, cfg.Input.Height}, "input.name": {0, 1}, "output.name": {0, 1}} {
		if _, ok := sources[key]; !ok && v[0] != v[1] {
			sources[key] = SourceGraph
		}
	}
	labels, lsrc, err := findLabels(f, &cfg, det)
	if err != nil {
		return nil, err
	}
	sources["labels"] = lsrc
	before := cfg
	cfg.applyDefaults()
	for _, key := range settingKeys {
		take, ok := autoFields[key]
		switch {
		case !ok:
		case sources[key] != "":
			// Given, even as a zero value (pad_value: 0): keep it.
			take(&cfg, &before)
		case settingChanged(key, &before, &cfg):
			sources[key] = SourceDefault
		}
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if err := checkOutput(&cfg, graph, len(labels)); err != nil {
		return nil, err
	}
	return &Model{Config: cfg, Dir: f.Dir, Path: path, Version: f.Version, LabelNames: labels, NumClasses: len(labels), Graph: graph, Sources: sources}, nil
}

// settingChanged reports whether applyDefaults filled key.
func settingChanged(key string, before, after *Config) bool {
	var x, y Config
	autoFields[key](&x, before)
	autoFields[key](&y, after)
	return !reflect.DeepEqual(x, y)
}

func shapeOf(g *GraphIO) []int64 {
	if len(g.Outputs) == 0 {
		return nil
	}
	return g.Outputs[0].Shape
}

// findLabels reads the labels, from the first of: the file config.yaml
// names, labels.txt beside the model, the model's metadata, a preset.
func findLabels(f Found, cfg *Config, det *detected) ([]string, Source, error) {
	if cfg.Labels != "" {
		if strings.ContainsAny(cfg.Labels, `/\`) || strings.HasPrefix(cfg.Labels, ".") {
			return nil, "", fmt.Errorf("labels %q must be a plain file name in the model folder", cfg.Labels)
		}
		l, err := ReadLabels(filepath.Join(f.Dir, cfg.Labels))
		return l, SourceConfig, err
	}
	if f.Config != "" || f.File != filepath.Join(f.Dir, f.Name+".onnx") {
		if p := filepath.Join(f.Dir, DefaultLabels); isFile(p) {
			cfg.Labels = DefaultLabels
			l, err := ReadLabels(p)
			return l, SourceFile, err
		}
	}
	if det.labels != nil {
		return det.labels, det.labelSource, nil
	}
	return nil, "", fmt.Errorf("no labels: add %s (one class name a line) beside the model, or name a file in %s (labels:)", DefaultLabels, ConfigFile)
}

// DefaultLabels is the label file a model folder may hold without naming
// it in config.yaml.
const DefaultLabels = "labels.txt"

// Output returns the graph output the config decodes.
func (m *Model) Output() TensorInfo {
	for _, o := range m.Graph.Outputs {
		if o.Name == m.Config.Output.Name {
			return o
		}
	}
	return TensorInfo{Name: m.Config.Output.Name}
}

// checkOutput checks that the decoded output fits the decoding and the
// number of labels, where the graph fixes its dimensions.
func checkOutput(cfg *Config, graph *GraphIO, labels int) error {
	var out TensorInfo
	for _, o := range graph.Outputs {
		if o.Name == cfg.Output.Name {
			out = o
		}
	}
	s := out.Shape
	switch cfg.Output.Decoding {
	case DecodeLogits, DecodeProbabilities:
		if len(s) != 2 {
			return fmt.Errorf("output %q has shape %v; %s decoding wants [N,classes]", out.Name, s, cfg.Output.Decoding)
		}
		if s[1] > 0 && s[1] != int64(labels) {
			return fmt.Errorf("output %q has %d classes but the label file has %d names", out.Name, s[1], labels)
		}
	case DecodeYOLOv8:
		if len(s) != 3 {
			return fmt.Errorf("output %q has shape %v; yolov8 decoding wants [N,4+classes,anchors]", out.Name, s)
		}
		if s[1] > 0 && s[1] != int64(4+labels) {
			return fmt.Errorf("output %q has %d rows, which is not 4 + %d labels", out.Name, s[1], labels)
		}
	}
	return nil
}

// ReadLabels reads a label file: one class name a line, blank lines at the
// end ignored.
func ReadLabels(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("labels: %w", err)
	}
	defer f.Close()
	var labels []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		labels = append(labels, strings.TrimSpace(sc.Text()))
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("labels %s: %w", path, err)
	}
	for len(labels) > 0 && labels[len(labels)-1] == "" {
		labels = labels[:len(labels)-1]
	}
	if len(labels) == 0 {
		return nil, fmt.Errorf("labels %s: no class names", path)
	}
	for i, l := range labels {
		if l == "" {
			return nil, fmt.Errorf("labels %s: line %d is empty", path, i+1)
		}
	}
	return labels, nil
}

// Model control modes, as Triton's --model-control-mode names them; the
// model package's Controller implements them.
const (
	// ControlNone loads every model at startup; nothing changes after.
	ControlNone = "none"
	// ControlPoll loads every model at startup, then follows the
	// repository: new models load, changed ones reload, removed ones
	// unload.
	ControlPoll = "poll"
	// ControlExplicit loads the models named at startup (all with "*"),
	// then loads and unloads on request.
	ControlExplicit = "explicit"
)

// ControlModes lists the modes.
var ControlModes = []string{ControlNone, ControlPoll, ControlExplicit}
