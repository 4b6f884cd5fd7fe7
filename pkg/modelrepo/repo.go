package modelrepo

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
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

// LoadRepo loads every folder of root that holds a config.yaml. A model
// that fails validation is listed in Failed with the reason, and the
// others load; the load fails only when no model loads at all.
func LoadRepo(root string) (*Repo, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, fmt.Errorf("reading model repository: %w", err)
	}
	repo := &Repo{Root: root}
	var errs []error
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		if _, err := os.Stat(filepath.Join(root, e.Name(), ConfigFile)); err != nil {
			continue
		}
		m, err := Load(root, e.Name())
		if err != nil {
			errs = append(errs, err)
			if ValidName(e.Name()) {
				repo.Failed = append(repo.Failed, FailedModel{Name: e.Name(), Err: err})
			}
			continue
		}
		repo.Models = append(repo.Models, m)
	}
	if len(repo.Models) == 0 && len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	if len(repo.Models) == 0 {
		return nil, fmt.Errorf("model repository %s holds no model (a folder with %s); run `make models`", root, ConfigFile)
	}
	slices.SortFunc(repo.Models, func(a, b *Model) int { return strings.Compare(a.Name, b.Name) })
	return repo, nil
}

// Load reads and validates the model folder root/name.
func Load(root, name string) (*Model, error) {
	if !ValidName(name) {
		return nil, fmt.Errorf("invalid model name %q", name)
	}
	dir := filepath.Join(root, name)
	raw, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		return nil, fmt.Errorf("model %q: %w", name, err)
	}
	cfg, err := ParseConfig(raw)
	if err != nil {
		return nil, fmt.Errorf("model %q: %s: %w", name, ConfigFile, err)
	}
	m, err := resolve(dir, name, cfg)
	if err != nil {
		return nil, fmt.Errorf("model %q: %w", name, err)
	}
	return m, nil
}

// ParseConfig decodes a config.yaml strictly: unknown fields are errors.
func ParseConfig(raw []byte) (Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, fmt.Errorf("parsing: %w", err)
	}
	return cfg, nil
}

// resolve fills cfg from the ONNX graph and the label file and validates it.
func resolve(dir, name string, cfg Config) (*Model, error) {
	if cfg.Name == "" {
		cfg.Name = name
	}
	if cfg.Name != name {
		return nil, fmt.Errorf("config names the model %q but its folder is %q", cfg.Name, name)
	}
	cfg.applyDefaults()
	m := &Model{Dir: dir, Path: filepath.Join(dir, cfg.ModelFile)}
	graph, err := fillFromGraph(&cfg, m.Path)
	if err != nil {
		return nil, err
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	labels, err := ReadLabels(filepath.Join(dir, cfg.Labels))
	if err != nil {
		return nil, err
	}
	if err := checkOutput(&cfg, graph, len(labels)); err != nil {
		return nil, err
	}
	m.Config = cfg
	m.Graph = graph
	m.LabelNames = labels
	m.NumClasses = len(labels)
	return m, nil
}

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
