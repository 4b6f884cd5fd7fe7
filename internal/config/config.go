// Package config is the one configuration of infer-server: flags,
// VISIONSERVE_* environment variables and an optional strict YAML file,
// with the precedence flag > environment > file > default. Every value is
// parsed once here, validated and bounded, so the rest of the server reads
// plain fields.
package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/visionserve/visionserve/pkg/engine"
	"github.com/visionserve/visionserve/pkg/modelrepo"
	"github.com/visionserve/visionserve/pkg/ortlib"
	"gopkg.in/yaml.v3"
)

// Backends a model may be served on; "auto" picks the best one present.
var Backends = engine.BackendNames

// Config is everything infer-server is told.
type Config struct {
	// ModelRepo is the model repository folder.
	ModelRepo string `yaml:"model_repo"`
	// GRPCAddr is where the gRPC APIs listen.
	GRPCAddr string `yaml:"grpc_addr"`
	// HTTPAddr is where health, readiness and metrics are served over HTTP;
	// empty turns the HTTP server off.
	HTTPAddr string `yaml:"http_addr"`
	// RESTAddr is where the REST API listens (KServe v2 / Open Inference
	// Protocol with Triton's extensions, and the vision API); empty turns
	// it off. Triton's HTTP port is 8000.
	RESTAddr string `yaml:"rest_addr"`
	// MetricsAddr, when set, serves /metrics on a listener of its own
	// (loopback, say) instead of on HTTPAddr, so that the probe port can
	// be reachable without exposing metrics.
	MetricsAddr string `yaml:"metrics_addr"`
	// Backend is auto, ort-cpu, opencv, ort-cuda or ort-tensorrt.
	Backend string `yaml:"backend"`
	// ORTLib is the ONNX Runtime shared library; the default is where
	// scripts/setup.sh installs it, relative to the working directory.
	ORTLib string `yaml:"ort_lib"`
	// CUDARuntimeLib is the CUDA runtime library (libcudart) that pinned
	// host memory comes from, when it is not on the loader's path (as in
	// a PyTorch environment); empty searches the loader's path.
	CUDARuntimeLib string `yaml:"cudart_lib"`
	// ORTThreads is ONNX Runtime's intra-op thread count; 0 means one per CPU.
	ORTThreads int `yaml:"ort_threads"`
	// MaxMessageBytes bounds a received gRPC message; gRPC itself refuses a
	// bigger one with ResourceExhausted before it is read.
	MaxMessageBytes int `yaml:"max_message_bytes"`
	// MaxConcurrentCalls bounds the unary API calls in progress: beyond
	// it a call is refused before its message is read. 0: no bound.
	MaxConcurrentCalls int `yaml:"max_concurrent_calls"`
	// DecodeMemoryBudget bounds the bytes of images being decoded at
	// once (width × height × 3 at the decoded size, read from the header
	// first); an image that does not fit now is refused with
	// ResourceExhausted. The default is a quarter of the container's
	// memory limit (cgroup), or DefaultDecodeBudget without one, and never
	// less than one image of MaxPixels.
	DecodeMemoryBudget int `yaml:"decode_memory_budget"`
	// MaxPixels bounds width×height of one input image.
	MaxPixels int `yaml:"max_pixels"`
	// MaxImagesPerRequest bounds the images of one unary request.
	MaxImagesPerRequest int `yaml:"max_images_per_request"`
	// MaxStreams bounds the concurrent StreamClassify/StreamDetect calls.
	MaxStreams int `yaml:"max_streams"`
	// MaxStreamsPerClient bounds the concurrent streams of one client (the
	// peer's host); 0 turns the bound off.
	MaxStreamsPerClient int `yaml:"max_streams_per_client"`
	// StreamIdleTimeout ends a stream that sends no frame for that long.
	StreamIdleTimeout time.Duration `yaml:"stream_idle_timeout"`
	// GracePeriod is how long shutdown waits for calls in flight before it
	// cancels them.
	GracePeriod time.Duration `yaml:"grace_period"`
	// TLSCert and TLSKey turn on TLS; TLSClientCA additionally requires
	// and verifies client certificates (mTLS).
	TLSCert     string `yaml:"tls_cert"`
	TLSKey      string `yaml:"tls_key"`
	TLSClientCA string `yaml:"tls_client_ca"`
	// AuthToken, when set, is the bearer token every API call must carry
	// (health checking and reflection stay open).
	AuthToken string `yaml:"auth_token"`
	// LogFormat is text or json; LogLevel is debug, info, warn or error.
	LogFormat string `yaml:"log_format"`
	LogLevel  string `yaml:"log_level"`
	// GPUMemoryBudget is the GPU memory, in bytes, the models may take per
	// device; a model that would not fit is refused. 0 means no budget.
	GPUMemoryBudget int `yaml:"gpu_memory_budget"`
	// GPUFailover says what a failing GPU batch does: "off" (the error
	// goes to its callers), "fail" (its callers get Unavailable, later
	// batches run on the CPU until the GPU answers again) or "retry" (as
	// fail, but the batch is rerun on the CPU so its callers succeed).
	GPUFailover string `yaml:"gpu_failover"`
	// GPUBatchPadding says what batch sizes GPU engines run at: "max"
	// (always max_batch_size: one input shape), "warmed" (the smallest
	// warmed-up size that holds the batch: the model's preferred sizes and
	// max) or "none" (its own size). The CUDA provider re-plans whenever
	// the input shape changes, which costs more than the padding.
	GPUBatchPadding string `yaml:"gpu_batch_padding"`
	// TensorRTCacheDir keeps TensorRT engine and timing caches across
	// restarts; empty turns the caches off.
	TensorRTCacheDir string `yaml:"tensorrt_cache_dir"`
	// TensorRTFP16 lets TensorRT use half-precision kernels.
	TensorRTFP16 bool `yaml:"tensorrt_fp16"`
	// StrictReadiness keeps the server not ready while any model is
	// unavailable (Triton's --strict-readiness); without it the server is
	// ready once every model is ready or unavailable and one is ready.
	StrictReadiness bool `yaml:"strict_readiness"`
	// ExitOnError makes startup fail when any model cannot be served
	// (Triton's --exit-on-error); without it the server serves the models
	// it can and reports the others unavailable.
	ExitOnError bool `yaml:"exit_on_error"`
	// Models are single ONNX files (NAME.onnx) served beside the
	// repository's models, understood from their metadata.
	Models []string `yaml:"models"`
	// ModelControlMode is none (load at startup only), poll (follow the
	// repository folder) or explicit (load and unload on request), as
	// Triton's --model-control-mode.
	ModelControlMode string `yaml:"model_control_mode"`
	// RepositoryPollInterval is how often poll mode looks at the
	// repository.
	RepositoryPollInterval time.Duration `yaml:"repository_poll_interval"`
	// LoadModels are the models explicit mode loads at startup ("*": all).
	LoadModels []string `yaml:"load_models"`
	// Precision is fp32 or fp16: with fp16 the GPU backends convert each
	// model to half precision at load (float32 in and out).
	Precision string `yaml:"precision"`
}

// Precisions the GPU backends run models at.
var Precisions = []string{"fp32", "fp16"}

// Model control modes (Triton's --model-control-mode).
var ModelControlModes = modelrepo.ControlModes

// GPU failover modes.
var GPUFailoverModes = []string{"off", "fail", "retry"}

// GPU batch padding policies.
var GPUBatchPaddings = []string{"max", "warmed", "none"}

// Bounds of the numeric settings.
const (
	MinMessageBytes        = 1 << 10
	MaxMessageBytesAny     = 1<<31 - 1
	MaxPixelsAny           = 1 << 30
	MaxImagesPerRequestAny = 4096
	MaxStreamsAny          = 1 << 16
	MaxGracePeriod         = 10 * time.Minute
	MaxORTThreads          = 1024
)

// Default returns the configuration used where nothing else is said.
func Default() Config {
	return Config{
		ModelRepo:              "./models",
		GRPCAddr:               ":8001",
		HTTPAddr:               ":8002",
		RESTAddr:               ":8000",
		Backend:                engine.Auto,
		ORTLib:                 ortlib.DefaultLibPath,
		MaxMessageBytes:        16 << 20,
		MaxConcurrentCalls:     128,
		DecodeMemoryBudget:     DecodeBudgetFor(MemoryLimit(os.ReadFile), 40_000_000),
		MaxPixels:              40_000_000,
		MaxImagesPerRequest:    64,
		MaxStreams:             64,
		MaxStreamsPerClient:    16,
		StreamIdleTimeout:      time.Minute,
		GracePeriod:            30 * time.Second,
		LogFormat:              "text",
		LogLevel:               "info",
		GPUFailover:            "fail",
		GPUBatchPadding:        "max",
		StrictReadiness:        true,
		ModelControlMode:       modelrepo.ControlNone,
		RepositoryPollInterval: 15 * time.Second,
		Precision:              "fp32",
	}
}

// EnvPrefix starts the name of every environment variable read.
const EnvPrefix = "VISIONSERVE_"

// setting is one named value of Config.
type setting struct {
	name  string // flag name; the env name is derived from it
	usage string
	set   func(c *Config, v string) error
}

func (s setting) env() string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(s.name, "-", "_"))
}

func str(f func(*Config) *string) func(*Config, string) error {
	return func(c *Config, v string) error { *f(c) = v; return nil }
}

// list sets a list from comma-separated text; a repeated flag gives the
// values of every occurrence.
func list(f func(*Config) *[]string) func(*Config, string) error {
	return func(c *Config, v string) error {
		var out []string
		for _, x := range strings.Split(v, ",") {
			if x = strings.TrimSpace(x); x != "" {
				out = append(out, x)
			}
		}
		*f(c) = out
		return nil
	}
}

func integer(f func(*Config) *int) func(*Config, string) error {
	return func(c *Config, v string) error {
		n, err := strconv.ParseInt(strings.ReplaceAll(v, "_", ""), 0, 64)
		if err != nil {
			// Allow 40e6 style numbers for pixel counts.
			fl, ferr := strconv.ParseFloat(v, 64)
			if ferr != nil || fl != float64(int64(fl)) {
				return fmt.Errorf("%q is not an integer", v)
			}
			n = int64(fl)
		}
		*f(c) = int(n)
		return nil
	}
}

func boolean(f func(*Config) *bool) func(*Config, string) error {
	return func(c *Config, v string) error {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("%q is not true or false", v)
		}
		*f(c) = b
		return nil
	}
}

func duration(f func(*Config) *time.Duration) func(*Config, string) error {
	return func(c *Config, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("%q is not a duration (like 30s)", v)
		}
		*f(c) = d
		return nil
	}
}

var settings = []setting{
	{"model-repo", "model repository folder", str(func(c *Config) *string { return &c.ModelRepo })},
	{"grpc-addr", "gRPC listen address", str(func(c *Config) *string { return &c.GRPCAddr })},
	{"http-addr", "HTTP (health, metrics) listen address; empty turns it off", str(func(c *Config) *string { return &c.HTTPAddr })},
	{"rest-addr", "REST API listen address (KServe v2 / Triton HTTP, the vision API); empty turns it off", str(func(c *Config) *string { return &c.RESTAddr })},
	{"metrics-addr", "separate listen address for /metrics (empty: served on --http-addr)", str(func(c *Config) *string { return &c.MetricsAddr })},
	{"backend", "inference backend: " + strings.Join(Backends, "|"), str(func(c *Config) *string { return &c.Backend })},
	{"ort-lib", "ONNX Runtime shared library (default: where scripts/setup.sh installs it)", str(func(c *Config) *string { return &c.ORTLib })},
	{"cudart-lib", "CUDA runtime library for pinned host memory (default: the loader's path)", str(func(c *Config) *string { return &c.CUDARuntimeLib })},
	{"ort-threads", "ONNX Runtime intra-op threads (0: one per CPU)", integer(func(c *Config) *int { return &c.ORTThreads })},
	{"max-message-bytes", "largest gRPC message received", integer(func(c *Config) *int { return &c.MaxMessageBytes })},
	{"max-concurrent-calls", "most unary API calls in progress; more are refused before their message is read (0: no bound)", integer(func(c *Config) *int { return &c.MaxConcurrentCalls })},
	{"decode-memory-budget", "bytes of images being decoded at once (default: a quarter of the cgroup memory limit, else 2 GiB)", integer(func(c *Config) *int { return &c.DecodeMemoryBudget })},
	{"max-pixels", "largest image, width×height", integer(func(c *Config) *int { return &c.MaxPixels })},
	{"max-images-per-request", "most images in one request", integer(func(c *Config) *int { return &c.MaxImagesPerRequest })},
	{"max-streams", "most concurrent video streams", integer(func(c *Config) *int { return &c.MaxStreams })},
	{"max-streams-per-client", "most concurrent video streams from one client host (0: no bound)", integer(func(c *Config) *int { return &c.MaxStreamsPerClient })},
	{"stream-idle-timeout", "end a video stream that sends no frame for this long", duration(func(c *Config) *time.Duration { return &c.StreamIdleTimeout })},
	{"grace-period", "how long shutdown waits for calls in flight", duration(func(c *Config) *time.Duration { return &c.GracePeriod })},
	{"tls-cert", "TLS certificate (PEM); turns TLS on with --tls-key", str(func(c *Config) *string { return &c.TLSCert })},
	{"tls-key", "TLS private key (PEM)", str(func(c *Config) *string { return &c.TLSKey })},
	{"tls-client-ca", "CA bundle (PEM) that client certificates must chain to; requires mTLS", str(func(c *Config) *string { return &c.TLSClientCA })},
	{"auth-token", "bearer token required on API calls (health and reflection stay open)", str(func(c *Config) *string { return &c.AuthToken })},
	{"log-format", "log format: text|json", str(func(c *Config) *string { return &c.LogFormat })},
	{"log-level", "log level: debug|info|warn|error", str(func(c *Config) *string { return &c.LogLevel })},
	{"gpu-memory-budget", "GPU memory in bytes the models may take per device (0: no budget)", integer(func(c *Config) *int { return &c.GPUMemoryBudget })},
	{"gpu-failover", "on a GPU failure: off|fail (Unavailable, then CPU until the GPU recovers)|retry (rerun the batch on the CPU)", str(func(c *Config) *string { return &c.GPUFailover })},
	{"gpu-batch-padding", "batch sizes GPU engines run at: max (pad every batch to max_batch_size)|warmed (to the smallest warmed-up size)|none", str(func(c *Config) *string { return &c.GPUBatchPadding })},
	{"tensorrt-cache-dir", "folder for TensorRT engine and timing caches (empty: no cache)", str(func(c *Config) *string { return &c.TensorRTCacheDir })},
	{"tensorrt-fp16", "let TensorRT use FP16 kernels", boolean(func(c *Config) *bool { return &c.TensorRTFP16 })},
	{"strict-readiness", "not ready while any model is unavailable", boolean(func(c *Config) *bool { return &c.StrictReadiness })},
	{"exit-on-error", "fail startup when any model cannot be served", boolean(func(c *Config) *bool { return &c.ExitOnError })},
	{"model", "also serve this ONNX file, NAME.onnx, understood from its metadata (repeatable)", list(func(c *Config) *[]string { return &c.Models })},
	{"model-control-mode", "none (load at startup) | poll (follow the repository folder) | explicit (load and unload on request)", str(func(c *Config) *string { return &c.ModelControlMode })},
	{"repository-poll-interval", "how often --model-control-mode poll looks at the repository", duration(func(c *Config) *time.Duration { return &c.RepositoryPollInterval })},
	{"precision", "fp32 | fp16: GPU backends convert each model to half precision at load (float32 in and out)", str(func(c *Config) *string { return &c.Precision })},
	{"load-model", "--model-control-mode explicit: a model to load at startup (repeatable; * for all)", list(func(c *Config) *[]string { return &c.LoadModels })},
}

// listSettings take repeated flags.
var listSettings = map[string]bool{"model": true, "load-model": true}

// ConfigFlag names the flag (and, as VISIONSERVE_CONFIG, the variable) of
// the optional YAML file.
const ConfigFlag = "config"

// rawValue records the text given to a flag; the config is assembled after
// all sources are read so that precedence does not depend on flag order.
type rawValue struct {
	v    string
	set  bool
	list bool // a repeated flag adds to the list
}

func (r *rawValue) String() string { return r.v }
func (r *rawValue) Set(v string) error {
	if r.list && r.set {
		v = r.v + "," + v
	}
	r.v, r.set = v, true
	return nil
}

// ErrHelp is returned when -h or --help was asked for; usage was printed.
var ErrHelp = flag.ErrHelp

// Load assembles the configuration from args (without the program name),
// the environment read through getenv and the file named by --config or
// VISIONSERVE_CONFIG. Usage and flag errors are written to usage.
func Load(args []string, getenv func(string) string, usage io.Writer) (Config, error) {
	fs := flag.NewFlagSet("infer-server", flag.ContinueOnError)
	fs.SetOutput(usage)
	raw := make([]*rawValue, len(settings))
	def := Default()
	defaults := map[string]string{
		"model-repo": def.ModelRepo, "grpc-addr": def.GRPCAddr, "http-addr": def.HTTPAddr, "rest-addr": def.RESTAddr,
		"backend": def.Backend, "max-message-bytes": strconv.Itoa(def.MaxMessageBytes), "max-concurrent-calls": strconv.Itoa(def.MaxConcurrentCalls), "decode-memory-budget": strconv.Itoa(def.DecodeMemoryBudget),
		"max-pixels": strconv.Itoa(def.MaxPixels), "max-images-per-request": strconv.Itoa(def.MaxImagesPerRequest),
		"max-streams": strconv.Itoa(def.MaxStreams), "max-streams-per-client": strconv.Itoa(def.MaxStreamsPerClient),
		"stream-idle-timeout": def.StreamIdleTimeout.String(), "grace-period": def.GracePeriod.String(),
		"log-format": def.LogFormat, "log-level": def.LogLevel, "ort-threads": "0",
		"gpu-memory-budget": "0", "gpu-failover": def.GPUFailover, "tensorrt-fp16": "false",
		"gpu-batch-padding": def.GPUBatchPadding, "strict-readiness": "true", "exit-on-error": "false",
		"model-control-mode": def.ModelControlMode, "precision": def.Precision, "repository-poll-interval": def.RepositoryPollInterval.String(),
	}
	for i, s := range settings {
		raw[i] = &rawValue{v: defaults[s.name], list: listSettings[s.name]}
		fs.Var(raw[i], s.name, s.usage+" (env "+s.env()+")")
	}
	file := fs.String(ConfigFlag, "", "optional YAML config file, strict (env "+EnvPrefix+"CONFIG)")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}

	cfg := def
	path := *file
	if path == "" {
		path = getenv(EnvPrefix + "CONFIG")
	}
	if path != "" {
		if err := loadFile(&cfg, path); err != nil {
			return Config{}, err
		}
	}
	for _, s := range settings {
		if v := getenv(s.env()); v != "" {
			if err := s.set(&cfg, v); err != nil {
				return Config{}, fmt.Errorf("$%s: %w", s.env(), err)
			}
		}
	}
	for i, s := range settings {
		if raw[i].set {
			if err := s.set(&cfg, raw[i].v); err != nil {
				return Config{}, fmt.Errorf("--%s: %w", s.name, err)
			}
		}
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// loadFile decodes a YAML file onto cfg; unknown keys are errors so that a
// misspelt setting does not silently keep its default.
func loadFile(cfg *Config, path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("reading config file: %w", err)
	}
	if err := decodeYAML(cfg, b); err != nil {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	return nil
}

func decodeYAML(cfg *Config, b []byte) error {
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// Validate checks every field and joins all problems into one error.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.ModelRepo == "" {
		bad("model-repo is empty")
	}
	if c.GRPCAddr == "" {
		bad("grpc-addr is empty")
	}
	if !slices.Contains(Backends, c.Backend) {
		bad("unknown backend %q (want %s)", c.Backend, strings.Join(Backends, ", "))
	}
	if c.ORTThreads < 0 || c.ORTThreads > MaxORTThreads {
		bad("ort-threads %d out of range (0..%d)", c.ORTThreads, MaxORTThreads)
	}
	if c.MaxMessageBytes < MinMessageBytes || c.MaxMessageBytes > MaxMessageBytesAny {
		bad("max-message-bytes %d out of range (%d..%d)", c.MaxMessageBytes, MinMessageBytes, MaxMessageBytesAny)
	}
	if c.MaxPixels < 1 || c.MaxPixels > MaxPixelsAny {
		bad("max-pixels %d out of range (1..%d)", c.MaxPixels, MaxPixelsAny)
	}
	if c.MaxImagesPerRequest < 1 || c.MaxImagesPerRequest > MaxImagesPerRequestAny {
		bad("max-images-per-request %d out of range (1..%d)", c.MaxImagesPerRequest, MaxImagesPerRequestAny)
	}
	if c.MaxStreams < 1 || c.MaxStreams > MaxStreamsAny {
		bad("max-streams %d out of range (1..%d)", c.MaxStreams, MaxStreamsAny)
	}
	if c.DecodeMemoryBudget < 1<<20 {
		bad("decode-memory-budget %d below 1 MiB", c.DecodeMemoryBudget)
	}
	if c.MaxConcurrentCalls < 0 || c.MaxConcurrentCalls > MaxStreamsAny {
		bad("max-concurrent-calls %d out of range (0..%d)", c.MaxConcurrentCalls, MaxStreamsAny)
	}
	if c.MaxStreamsPerClient < 0 || c.MaxStreamsPerClient > MaxStreamsAny {
		bad("max-streams-per-client %d out of range (0..%d)", c.MaxStreamsPerClient, MaxStreamsAny)
	}
	if c.StreamIdleTimeout < time.Second || c.StreamIdleTimeout > time.Hour {
		bad("stream-idle-timeout %v out of range (1s..1h)", c.StreamIdleTimeout)
	}
	if c.GracePeriod < 0 || c.GracePeriod > MaxGracePeriod {
		bad("grace-period %v out of range (0..%v)", c.GracePeriod, MaxGracePeriod)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		bad("tls-cert and tls-key go together")
	}
	if c.TLSClientCA != "" && c.TLSCert == "" {
		bad("tls-client-ca needs tls-cert and tls-key (mTLS is TLS plus client certificates)")
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		bad("log-format %q unknown (want text or json)", c.LogFormat)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("log-level %q unknown (want debug, info, warn or error)", c.LogLevel)
	}
	if c.GPUMemoryBudget < 0 {
		bad("gpu-memory-budget %d is negative", c.GPUMemoryBudget)
	}
	if !slices.Contains(GPUFailoverModes, c.GPUFailover) {
		bad("gpu-failover %q unknown (want %s)", c.GPUFailover, strings.Join(GPUFailoverModes, ", "))
	}
	if !slices.Contains(GPUBatchPaddings, c.GPUBatchPadding) {
		bad("gpu-batch-padding %q unknown (want %s)", c.GPUBatchPadding, strings.Join(GPUBatchPaddings, ", "))
	}
	if !slices.Contains(Precisions, c.Precision) {
		bad("precision %q unknown (want %s)", c.Precision, strings.Join(Precisions, ", "))
	} else if c.Precision == "fp16" && (c.Backend == engine.ORTCPU || c.Backend == engine.OpenCV) {
		bad("precision fp16 is for the GPU backends (ort-cuda, ort-tensorrt, or auto on a machine with a GPU), not %s", c.Backend)
	}
	if !slices.Contains(ModelControlModes, c.ModelControlMode) {
		bad("model-control-mode %q unknown (want %s)", c.ModelControlMode, strings.Join(ModelControlModes, ", "))
	}
	if c.RepositoryPollInterval < 100*time.Millisecond || c.RepositoryPollInterval > time.Hour {
		bad("repository-poll-interval %v out of range (100ms..1h)", c.RepositoryPollInterval)
	}
	if len(c.LoadModels) > 0 && c.ModelControlMode != modelrepo.ControlExplicit {
		bad("load-model is for --model-control-mode explicit (the other modes load every model)")
	}
	for _, p := range c.Models {
		if !strings.HasSuffix(p, ".onnx") {
			bad("model %q: want a NAME.onnx file", p)
		}
	}
	return errors.Join(errs...)
}

// TLS reports whether TLS is configured.
func (c Config) TLS() bool { return c.TLSCert != "" }
