// Command loadsweep measures running visionserve servers under load and
// writes a report: for every model it sweeps closed-loop concurrency
// (N clients back to back) and open-loop request rate (fixed rates, by
// default fractions of the peak the concurrency sweep found), then writes
// <out>/<date>-<machine>/report.md with the machine, versions, command
// line, a table per model and a PNG latency-versus-throughput plot per
// model, and results.json with every figure.
//
//	loadsweep -addr 127.0.0.1:8001[,127.0.0.1:9001] [-models a,b] [-concurrency 1,4,16] [-rate-fractions 0.5,0.9,1.1] [-step 10s]
//
// Start the servers first (`make run`, or bin/infer-server --backend
// ort-cpu --grpc-addr :9001 for a second backend); loadsweep waits until
// their models are ready.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/visionserve/visionserve/internal/machine"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the command's flags.
type options struct {
	addrs         []string
	models        []string
	concurrency   []int
	rates         []float64
	rateFractions []float64
	step, warmup  time.Duration
	timeout       time.Duration
	readyTimeout  time.Duration
	maxInFlight   int
	imageDetect   string
	imageClassify string
	out           string
	machine       string
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("loadsweep", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addrs := fs.String("addr", "127.0.0.1:8001", "gRPC addresses of running servers, comma-separated")
	models := fs.String("models", "", "models to sweep, comma-separated (default: every model of each server)")
	conc := fs.String("concurrency", "1,2,4,8,16", "closed-loop client counts")
	rates := fs.String("rates", "", "open-loop rates in requests/s (default: -rate-fractions of the peak)")
	fracs := fs.String("rate-fractions", "0.5,0.9,1.1", "open-loop rates as fractions of the closed-loop peak")
	fs.DurationVar(&o.step, "step", 10*time.Second, "how long each load is held")
	fs.DurationVar(&o.warmup, "warmup", 3*time.Second, "load before each model's sweep, not reported")
	fs.DurationVar(&o.timeout, "timeout", 30*time.Second, "deadline of one request")
	fs.DurationVar(&o.readyTimeout, "ready-timeout", 5*time.Minute, "how long to wait for the servers' models to be ready")
	fs.IntVar(&o.maxInFlight, "max-in-flight", 512, "open loop: most outstanding requests")
	fs.StringVar(&o.imageDetect, "image-detect", "", "image sent to detectors (default ../shared/testdata/images/bus.jpg, else synthetic)")
	fs.StringVar(&o.imageClassify, "image-classify", "", "image sent to classifiers (default ../shared/testdata/images/dog.jpg, else synthetic)")
	fs.StringVar(&o.out, "out", "benchmarks/results", "folder of result folders")
	fs.StringVar(&o.machine, "machine", "", "machine name in the result folder (default: host name)")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	var err error
	o.addrs = splitList(*addrs)
	o.models = splitList(*models)
	if o.concurrency, err = parseInts(*conc); err != nil {
		return o, fmt.Errorf("-concurrency: %w", err)
	}
	if o.rates, err = parseFloats(*rates); err != nil {
		return o, fmt.Errorf("-rates: %w", err)
	}
	if o.rateFractions, err = parseFloats(*fracs); err != nil {
		return o, fmt.Errorf("-rate-fractions: %w", err)
	}
	switch {
	case len(o.addrs) == 0:
		return o, errors.New("-addr: no address")
	case len(o.concurrency) == 0:
		return o, errors.New("-concurrency: no client count")
	case o.step <= 0:
		return o, fmt.Errorf("-step %v must be positive", o.step)
	case o.warmup < 0 || o.timeout <= 0 || o.maxInFlight < 1:
		return o, errors.New("-warmup must not be negative, -timeout and -max-in-flight must be positive")
	}
	if o.machine == "" {
		o.machine, _ = os.Hostname()
	}
	o.machine = sanitize(o.machine)
	return o, nil
}

func splitList(s string) []string {
	var out []string
	for f := range strings.SplitSeq(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func parseInts(s string) ([]int, error) {
	var out []int
	for _, f := range splitList(s) {
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%q is not a positive integer", f)
		}
		out = append(out, n)
	}
	return out, nil
}

func parseFloats(s string) ([]float64, error) {
	var out []float64
	for _, f := range splitList(s) {
		v, err := strconv.ParseFloat(f, 64)
		if err != nil || !(v > 0) || v > 1e9 {
			return nil, fmt.Errorf("%q is not a positive number", f)
		}
		out = append(out, v)
	}
	return out, nil
}

// sanitize keeps a name safe as a folder name.
func sanitize(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	if b.Len() == 0 || strings.Trim(b.String(), ".") == "" {
		return "machine"
	}
	return b.String()
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	o, err := parseFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "loadsweep:", err)
		return 2
	}
	rep, dir, err := sweepAll(ctx, o, args, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "loadsweep:", err)
		return 1
	}
	fmt.Fprintf(stdout, "report: %s\n", filepath.Join(dir, "report.md"))
	for _, h := range rep.headlines() {
		fmt.Fprintf(stdout, "%s on %s: peak %.1f images/s (%s); 1 client p50 / p99: %s\n",
			h.Model, h.Backend, h.Peak, h.PeakAt, h.oneClient())
	}
	return 0
}

// sweepAll sweeps every model of every server and writes the report
// folder.
func sweepAll(ctx context.Context, o options, args []string, progress io.Writer) (Report, string, error) {
	rep := Report{
		Date:    time.Now(),
		Command: commandLine(args),
		Machine: machine.Read(ctx, o.machine),
		Step:    o.step,
		Warmup:  o.warmup,
	}
	dir := filepath.Join(o.out, rep.Date.UTC().Format("2006-01-02")+"-"+o.machine)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return rep, dir, err
	}
	imgs, err := loadImages(o)
	if err != nil {
		return rep, dir, err
	}
	for _, addr := range o.addrs {
		sweeps, err := sweepServer(ctx, o, addr, imgs, dir, progress)
		if err != nil {
			return rep, dir, fmt.Errorf("server %s: %w", addr, err)
		}
		rep.Sweeps = append(rep.Sweeps, sweeps...)
	}
	rep.Machine.LoadEnd = machine.LoadAvg()
	if err := writeReport(rep, dir); err != nil {
		return rep, dir, err
	}
	return rep, dir, nil
}

func writeReport(rep Report, dir string) error {
	f, err := os.Create(filepath.Join(dir, "report.md"))
	if err != nil {
		return err
	}
	if err := rep.writeMarkdown(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "results.json"), append(js, '\n'), 0o644)
}

// commandLine quotes args as a shell would need them.
func commandLine(args []string) string {
	parts := []string{"loadsweep"}
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n'\"$\\*?;&|<>()") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}
