package modelrepo

import (
	"bytes"
	_ "embed"
	"fmt"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Source says where a model setting came from.
type Source string

// Sources of a setting, in the order they win: config.yaml overrides the
// model's own metadata, which overrides the graph's shapes, a preset and
// the built-in defaults.
const (
	SourceConfig   Source = "config"   // config.yaml
	SourceFile     Source = "file"     // labels.txt beside the model
	SourceMetadata Source = "metadata" // the ONNX metadata_props (an Ultralytics export)
	SourceGraph    Source = "graph"    // the graph's input and output shapes
	SourcePreset   Source = "preset"   // a named preset (imagenet)
	SourceDefault  Source = "default"  // the built-in default
)

// Presets a config.yaml may name with `preset:`.
const (
	// PresetImageNet is a torchvision ImageNet classifier: the 1000
	// ImageNet labels, RGB, mean [0.485,0.456,0.406], std
	// [0.229,0.224,0.225], shorter side 256 then centre crop 224 (scaled
	// with the input size), logits. A model with no config.yaml and no
	// Ultralytics metadata whose output is [N,1000] gets it.
	PresetImageNet = "imagenet"
	// PresetNone turns the automatic preset off.
	PresetNone = "none"
)

// imagenetLabels are the 1000 ImageNet class names in the index order of
// torchvision and ONNX Model Zoo classifiers.
//
//go:embed presets/imagenet1000.txt
var imagenetLabels string

// settingKeys are the settings whose source a Model reports, in order.
var settingKeys = []string{
	"task", "labels", "input.name", "input.width", "input.height", "input.color",
	"input.scale", "input.mean", "input.std", "input.resize", "input.resize_shorter",
	"input.pad_value", "output.name", "output.decoding",
}

// autoFields copy one setting from a detected config into the served one.
var autoFields = map[string]func(dst, src *Config){
	"task":                 func(d, s *Config) { d.Task = s.Task },
	"input.width":          func(d, s *Config) { d.Input.Width = s.Input.Width },
	"input.height":         func(d, s *Config) { d.Input.Height = s.Input.Height },
	"input.color":          func(d, s *Config) { d.Input.Color = s.Input.Color },
	"input.scale":          func(d, s *Config) { d.Input.Scale = s.Input.Scale },
	"input.mean":           func(d, s *Config) { d.Input.Mean = s.Input.Mean },
	"input.std":            func(d, s *Config) { d.Input.Std = s.Input.Std },
	"input.resize":         func(d, s *Config) { d.Input.Resize = s.Input.Resize },
	"input.resize_shorter": func(d, s *Config) { d.Input.ResizeShorter = s.Input.ResizeShorter },
	"input.pad_value":      func(d, s *Config) { d.Input.PadValue = s.Input.PadValue },
	"output.decoding":      func(d, s *Config) { d.Output.Decoding = s.Output.Decoding },
}

// detected is what a model's graph and metadata say about it.
type detected struct {
	cfg    Config
	set    map[string]Source // the settings of cfg that were detected
	labels []string
	// labelSource is where labels came from (metadata or preset).
	labelSource Source
}

func (d *detected) put(key string, src Source, apply func(*Config)) {
	apply(&d.cfg)
	d.set[key] = src
}

// detect reads what the graph and its metadata say the model is. It fails
// only for a model it recognises but cannot serve (an Ultralytics
// segmentation export, an end-to-end export with NMS inside).
func detect(io *GraphIO, preset string) (*detected, error) {
	d := &detected{set: map[string]Source{}}
	meta := io.Metadata
	if meta["names"] != "" && meta["task"] != "" {
		return d, d.ultralytics(io)
	}
	if preset == PresetNone {
		return d, nil
	}
	if preset == PresetImageNet || classes(io) == 1000 {
		d.imagenet(io)
	}
	return d, nil
}

// classes is the class count of a [N,classes] first output, else 0.
func classes(io *GraphIO) int64 {
	if len(io.Outputs) == 0 {
		return 0
	}
	s := io.Outputs[0].Shape
	if len(s) != 2 {
		return 0
	}
	return s[1]
}

// ultralytics reads an Ultralytics export's metadata: task, names, imgsz
// and end2end; the preprocessing is Ultralytics' own (RGB, /255; letterbox
// with pad 114 for detect, resize and centre crop for classify).
func (d *detected) ultralytics(io *GraphIO) error {
	meta := io.Metadata
	if meta["end2end"] == "True" {
		return fmt.Errorf("Ultralytics end-to-end export (end2end: True, NMS inside the graph) is not served; export it with nms=False and end2end=False")
	}
	names, err := parseNames(meta["names"])
	if err != nil {
		return fmt.Errorf("Ultralytics metadata names: %w", err)
	}
	d.labels, d.labelSource = names, SourceMetadata
	d.put("input.color", SourceMetadata, func(c *Config) { c.Input.Color = "RGB" })
	d.put("input.scale", SourceMetadata, func(c *Config) { c.Input.Scale = 1.0 / 255 })
	d.put("input.mean", SourceMetadata, func(c *Config) { c.Input.Mean = [3]float32{} })
	d.put("input.std", SourceMetadata, func(c *Config) { c.Input.Std = [3]float32{1, 1, 1} })
	w, h := 0, 0
	if v := meta["imgsz"]; v != "" {
		if h, w, err = parseImgsz(v); err != nil {
			return fmt.Errorf("Ultralytics metadata imgsz: %w", err)
		}
		d.sizeFromMetadata(io, w, h)
	}
	switch task := meta["task"]; task {
	case "detect":
		d.put("task", SourceMetadata, func(c *Config) { c.Task = TaskDetect })
		d.put("input.resize", SourceMetadata, func(c *Config) { c.Input.Resize = ResizeLetterbox })
		d.put("input.pad_value", SourceMetadata, func(c *Config) { c.Input.PadValue = 114 })
		d.put("output.decoding", SourceMetadata, func(c *Config) { c.Output.Decoding = DecodeYOLOv8 })
	case "classify":
		// classify_transforms: the shorter side to the input size, then
		// the centre crop (crop fraction 1), probabilities out.
		d.put("task", SourceMetadata, func(c *Config) { c.Task = TaskClassify })
		d.put("input.resize", SourceMetadata, func(c *Config) { c.Input.Resize = ResizeShorterCrop })
		if side := max(w, h, sideOf(io)); side > 0 {
			d.put("input.resize_shorter", SourceMetadata, func(c *Config) { c.Input.ResizeShorter = side })
		}
		d.put("output.decoding", SourceMetadata, func(c *Config) { c.Output.Decoding = DecodeProbabilities })
	default:
		return fmt.Errorf("Ultralytics task %q is not served (detect and classify are)", task)
	}
	return nil
}

// sizeFromMetadata takes the input size from the metadata where the graph
// leaves it dynamic.
func (d *detected) sizeFromMetadata(io *GraphIO, w, h int) {
	if len(io.Inputs) != 1 || len(io.Inputs[0].Shape) != 4 {
		return
	}
	s := io.Inputs[0].Shape
	if s[2] <= 0 {
		d.put("input.height", SourceMetadata, func(c *Config) { c.Input.Height = h })
	}
	if s[3] <= 0 {
		d.put("input.width", SourceMetadata, func(c *Config) { c.Input.Width = w })
	}
}

// sideOf is the larger fixed side of the graph's input, else 0.
func sideOf(io *GraphIO) int {
	if len(io.Inputs) != 1 || len(io.Inputs[0].Shape) != 4 {
		return 0
	}
	s := io.Inputs[0].Shape
	return int(max(s[2], s[3], 0))
}

// imagenet applies the torchvision ImageNet preset.
func (d *detected) imagenet(io *GraphIO) {
	d.labels, d.labelSource = strings.Split(strings.TrimSpace(imagenetLabels), "\n"), SourcePreset
	d.put("task", SourcePreset, func(c *Config) { c.Task = TaskClassify })
	d.put("input.color", SourcePreset, func(c *Config) { c.Input.Color = "RGB" })
	d.put("input.scale", SourcePreset, func(c *Config) { c.Input.Scale = 1.0 / 255 })
	d.put("input.mean", SourcePreset, func(c *Config) { c.Input.Mean = [3]float32{0.485, 0.456, 0.406} })
	d.put("input.std", SourcePreset, func(c *Config) { c.Input.Std = [3]float32{0.229, 0.224, 0.225} })
	d.put("input.resize", SourcePreset, func(c *Config) { c.Input.Resize = ResizeShorterCrop })
	side := sideOf(io)
	if side == 0 {
		side = 224
		d.put("input.width", SourcePreset, func(c *Config) { c.Input.Width = 224 })
		d.put("input.height", SourcePreset, func(c *Config) { c.Input.Height = 224 })
	}
	// 256 for 224, as torchvision's resize-then-crop ratio 224/256.
	d.put("input.resize_shorter", SourcePreset, func(c *Config) { c.Input.ResizeShorter = side * 256 / 224 })
	decoding := DecodeLogits
	if len(io.Outputs) > 0 && io.OutputOps[io.Outputs[0].Name] == "Softmax" {
		decoding = DecodeProbabilities
	}
	d.put("output.decoding", SourcePreset, func(c *Config) { c.Output.Decoding = decoding })
}

// merge fills the settings config.yaml leaves out with the detected ones
// and returns the source of every setting set so far.
func (d *detected) merge(cfg *Config, present map[string]bool) map[string]Source {
	src := map[string]Source{}
	for key := range present {
		src[key] = SourceConfig
	}
	for key, take := range autoFields {
		if present[key] || d.set[key] == "" {
			continue
		}
		take(cfg, &d.cfg)
		src[key] = d.set[key]
	}
	return src
}

// configKeys lists the settings a config.yaml sets, as dotted paths
// ("input.mean"), so that a setting given as its zero value still counts
// as given.
func configKeys(raw []byte) (map[string]bool, error) {
	var doc yaml.Node
	if err := yaml.NewDecoder(bytes.NewReader(raw)).Decode(&doc); err != nil {
		if len(bytes.TrimSpace(raw)) == 0 {
			return map[string]bool{}, nil
		}
		return nil, err
	}
	keys := map[string]bool{}
	var walk func(n *yaml.Node, prefix string)
	walk = func(n *yaml.Node, prefix string) {
		if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
			walk(n.Content[0], prefix)
			return
		}
		if n.Kind != yaml.MappingNode {
			return
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			key := prefix + n.Content[i].Value
			keys[key] = true
			walk(n.Content[i+1], key+".")
		}
	}
	walk(&doc, "")
	return keys, nil
}

// parseNames reads Ultralytics' names metadata, a Python dict literal
// {0: 'person', 1: "a 'quoted' name", ...}, into labels by index; the
// indices must run 0..n-1.
func parseNames(s string) ([]string, error) {
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, "{") || !strings.HasSuffix(s, "}") {
		return nil, fmt.Errorf("not a {index: 'name'} dict")
	}
	rest := strings.TrimSpace(s[1 : len(s)-1])
	byIndex := map[int]string{}
	for rest != "" {
		colon := strings.IndexByte(rest, ':')
		if colon < 0 {
			return nil, fmt.Errorf("entry %q has no ':'", clip(rest))
		}
		idx, err := strconv.Atoi(strings.TrimSpace(rest[:colon]))
		if err != nil || idx < 0 || idx >= MaxClasses {
			return nil, fmt.Errorf("index %q is not an integer in 0..%d", clip(rest[:colon]), MaxClasses-1)
		}
		name, after, err := pyString(strings.TrimLeft(rest[colon+1:], " "))
		if err != nil {
			return nil, fmt.Errorf("name of class %d: %w", idx, err)
		}
		if _, dup := byIndex[idx]; dup {
			return nil, fmt.Errorf("class %d named twice", idx)
		}
		if strings.TrimSpace(name) == "" || strings.ContainsAny(name, "\n\r") {
			return nil, fmt.Errorf("class %d has an empty or multi-line name", idx)
		}
		byIndex[idx] = name
		after = strings.TrimSpace(after)
		if after == "" {
			break
		}
		if after[0] != ',' {
			return nil, fmt.Errorf("expected ',' after class %d", idx)
		}
		rest = strings.TrimSpace(after[1:])
	}
	if len(byIndex) == 0 {
		return nil, fmt.Errorf("no class names")
	}
	names := make([]string, len(byIndex))
	for i := range names {
		n, ok := byIndex[i]
		if !ok {
			return nil, fmt.Errorf("class %d is missing (indices must run 0..%d)", i, len(names)-1)
		}
		names[i] = n
	}
	return names, nil
}

// MaxClasses bounds the labels a model may have.
const MaxClasses = 100_000

// pyString reads one Python string literal ('...' or "...", with
// backslash escapes of the quote and the backslash) at the start of s.
func pyString(s string) (val, rest string, err error) {
	if s == "" || (s[0] != '\'' && s[0] != '"') {
		return "", "", fmt.Errorf("not a quoted string: %q", clip(s))
	}
	q := s[0]
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\' && i+1 < len(s):
			i++
			b.WriteByte(s[i])
		case c == q:
			return b.String(), s[i+1:], nil
		default:
			b.WriteByte(c)
		}
	}
	return "", "", fmt.Errorf("unterminated string %q", clip(s))
}

// parseImgsz reads imgsz metadata, "[640, 640]" (height, width) or "640".
func parseImgsz(s string) (h, w int, err error) {
	f := strings.FieldsFunc(s, func(r rune) bool { return r == '[' || r == ']' || r == ',' || r == ' ' || r == '(' || r == ')' })
	var sides []int
	for _, x := range f {
		n, err := strconv.Atoi(x)
		if err != nil || n < 1 || n > MaxInputSide {
			return 0, 0, fmt.Errorf("%q is not a size in 1..%d", clip(s), MaxInputSide)
		}
		sides = append(sides, n)
	}
	switch len(sides) {
	case 1:
		return sides[0], sides[0], nil
	case 2:
		return sides[0], sides[1], nil
	}
	return 0, 0, fmt.Errorf("%q is not [height, width]", clip(s))
}

func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "…"
	}
	return s
}

// SettingSources lists each setting and where it came from, in a fixed
// order, for logs ("task=metadata input.mean=preset ...").
func (m *Model) SettingSources() string {
	var b strings.Builder
	for _, k := range settingKeys {
		if s, ok := m.Sources[k]; ok {
			if b.Len() > 0 {
				b.WriteByte(' ')
			}
			fmt.Fprintf(&b, "%s=%s", k, s)
		}
	}
	return b.String()
}
