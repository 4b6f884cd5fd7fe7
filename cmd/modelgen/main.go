// Command modelgen writes the model repository's ONNX files: ResNet-50,
// MobileNetV3-Large and YOLOv8s graphs with the published architectures and
// deterministic, seeded weights (see internal/modelgen).
//
//	modelgen [-out DIR] [-seed N] [-models resnet50,mobilenetv3_large,yolov8s] [-quiet]
//
// It writes DIR/<name>/model.onnx for each model and nothing else (the
// config and labels next to it are committed). The same seed always gives
// byte-identical files. Progress goes to stderr.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/visionserve/visionserve/internal/modelgen"
	"github.com/visionserve/visionserve/pkg/onnx"
)

func main() {
	err := run(os.Args[1:], os.Stderr)
	code := exitCode(err)
	var u usageError
	if err != nil && !errors.Is(err, flag.ErrHelp) && !(errors.As(err, &u) && u.reported) {
		fmt.Fprintln(os.Stderr, "modelgen:", err)
	}
	os.Exit(code)
}

// usageError marks command-line mistakes; reported means the flag package
// has already printed it together with the usage.
type usageError struct {
	err      error
	reported bool
}

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// exitCode follows the flag package's convention: 0 for -h, 2 for usage
// errors, 1 for failures.
func exitCode(err error) int {
	var u usageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &u):
		return 2
	}
	return 1
}

// run is main without the process exit, so tests can drive it.
func run(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("modelgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "models", "model repository `directory`; each model goes to DIR/<name>/"+modelgen.FileName)
	seed := fs.Uint64("seed", 1, "weight seed; the same seed gives byte-identical files")
	models := fs.String("models", strings.Join(modelgen.Names(), ","), "comma-separated models to write")
	quiet := fs.Bool("quiet", false, "no progress output")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: modelgen [-out DIR] [-seed N] [-models %s] [-quiet]\n", strings.Join(modelgen.Names(), ","))
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err: err, reported: true}
	}
	if fs.NArg() > 0 {
		return usageError{err: fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))}
	}
	names, err := parseModels(*models)
	if err != nil {
		return usageError{err: err}
	}
	var progress io.Writer
	if !*quiet {
		progress = stderr
	}
	for _, name := range names {
		if err := generate(*out, name, *seed, progress); err != nil {
			return err
		}
	}
	return nil
}

// parseModels validates the -models list before anything is written, so a
// typo does not leave a half-regenerated repository.
func parseModels(list string) ([]string, error) {
	known := modelgen.Names()
	var names []string
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if n == "" {
			continue
		}
		ok := false
		for _, k := range known {
			ok = ok || k == n
		}
		if !ok {
			return nil, fmt.Errorf("unknown model %q (known: %s)", n, strings.Join(known, ", "))
		}
		names = append(names, n)
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("no models selected")
	}
	return names, nil
}

func generate(root, name string, seed uint64, progress io.Writer) error {
	start := time.Now()
	if progress != nil {
		fmt.Fprintf(progress, "%s: building (seed %d)\n", name, seed)
	}
	m, err := modelgen.Build(name, seed)
	if err != nil {
		return err
	}
	if progress != nil {
		fmt.Fprintf(progress, "%s: built in %.1fs, %d parameters\n", name, time.Since(start).Seconds(), onnx.FloatInitializerCount(m.GetGraph()))
	}
	dir := filepath.Join(root, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("generating %s: %w", name, err)
	}
	if err := modelgen.WriteFile(filepath.Join(dir, modelgen.FileName), m, progress); err != nil {
		return fmt.Errorf("generating %s: %w", name, err)
	}
	return nil
}
